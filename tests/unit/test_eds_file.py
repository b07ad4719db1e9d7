"""`epp serve --envoy-eds-file`: the standalone Envoy's pool cluster follows the endpoints."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from epp.datalayer.datastore import Datastore
from epp.datalayer.eds_file import CLA_TYPE, EdsFileWriter


def hosts(path: Path) -> list[str]:
    doc = yaml.safe_load(path.read_text())
    (cla,) = doc["resources"]
    assert cla["@type"] == CLA_TYPE and cla["cluster_name"] == "pool"
    out = []
    for group in cla["endpoints"]:
        for lb in group["lb_endpoints"]:
            sa = lb["endpoint"]["address"]["socket_address"]
            out.append(f"{sa['address']}:{sa['port_value']}")
    return out


async def test_eds_file_follows_the_datastore_in_one_write_per_change(tmp_path: Path) -> None:
    from epp.datalayer.endpoint import Endpoint

    ds = Datastore()
    ds.upsert_endpoint("s", Endpoint("10.0.0.2", 8000))
    path = tmp_path / "eds" / "pool.yaml"
    w = EdsFileWriter(ds, str(path))
    await w.start()
    assert hosts(path) == ["10.0.0.2:8000"]
    writes = w.writes
    # A reload that adds three endpoints at once is one write, on the next loop turn.
    ds.replace_endpoints(
        "s", [Endpoint("10.0.0.2", 8000), *(Endpoint(f"10.0.0.{i}", 8000) for i in (3, 4, 5))]
    )
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert w.writes == writes + 1
    assert hosts(path) == [f"10.0.0.{i}:8000" for i in (2, 3, 4, 5)]
    ds.remove_endpoint("10.0.0.3:8000")
    ds.remove_endpoint("10.0.0.2:8000")
    await asyncio.sleep(0)
    assert hosts(path) == ["10.0.0.4:8000", "10.0.0.5:8000"]
    assert not list(path.parent.glob(".*.tmp"))  # written via a temp file, then renamed
    for key in ("10.0.0.4:8000", "10.0.0.5:8000"):
        ds.remove_endpoint(key)
    await asyncio.sleep(0)
    assert hosts(path) == []  # an empty pool is a valid, empty assignment
    await w.stop()
