"""Standalone discovery: endpoints from flags and a real YAML file that is edited live."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import ROLE_BOTH, ROLE_DECODE, ROLE_PREFILL
from epp.datalayer.labels import LabelKeys, endpoint_from_labels
from epp.datalayer.static_source import (
    EndpointsFileError,
    StaticSource,
    parse_endpoints_yaml,
    parse_flag_endpoints,
)

FILE_V1 = """
endpoints:
  - address: 127.0.0.2
    port: 8000
    name: pod-a
    labels: {model: m, business: prod, role: decode, engine-type: vllm}
    metricsPort: 9100
  - address: 127.0.0.3
    ports: [8000, 8001]
    name: pod-b
    labels: {model: m, llm-d.ai/role: prefill, engine-type: sglang}
    ready: false
"""


async def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def keys(ds: Datastore) -> set[str]:
    return {ep.key for ep in ds.endpoints()}


# ---- pure parsing ---------------------------------------------------------------------------
def test_flag_endpoints() -> None:
    specs = parse_flag_endpoints(["127.0.0.2:8000", " 127.0.0.3:8000,8001 ", "[::1]:9000", ""])
    assert [s.key for s in specs] == [
        "127.0.0.2:8000",
        "127.0.0.3:8000",
        "127.0.0.3:8001",
        "[::1]:9000",
    ]
    for bad, why in [
        ("localhost:80", "not an IP"),
        ("::1:80", "IPv6"),
        ("127.0.0.1:x", "bad port"),
        ("127.0.0.1:70000", "1..65535"),
        ("127.0.0.1", "expected ip:port"),
        ("[::1]9000", "[ipv6]:port"),
    ]:
        with pytest.raises(EndpointsFileError, match=want_re(why)):
            parse_flag_endpoints([bad])


def want_re(text: str) -> str:
    return re.escape(text)


def overwrite_in_place(path: Path, text: str) -> None:
    """Rewrite the file without changing its inode (and here, its size)."""
    with open(path, "r+") as f:
        f.write(text)


def test_file_formats() -> None:
    specs = parse_endpoints_yaml(FILE_V1)
    assert [(s.key, s.name) for s in specs] == [
        ("127.0.0.2:8000", "pod-a"),
        ("127.0.0.3:8000", "pod-b:8000"),  # one endpoint per port, names kept distinct
        ("127.0.0.3:8001", "pod-b:8001"),
    ]
    assert specs[0].metrics_port == 9100 and specs[1].ready is False
    # A bare list works too, and scalar label values become strings.
    bare = parse_endpoints_yaml("- {address: 127.0.0.9, port: 80, labels: {model: 7}}\n")
    assert bare[0].labels == (("model", "7"),)
    assert parse_endpoints_yaml("endpoints: []") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("endpoints: [\n", "invalid YAML"),
        ("foo: []", "exactly one key `endpoints`"),
        ("- {address: 127.0.0.2}", "endpoints[0]: give exactly one of `port` or `ports`"),
        ("- {address: 127.0.0.2, port: 1, ports: [2]}", "exactly one of"),
        ("- {address: 127.0.0.2, port: 1, labes: {}}", "unknown key(s) ['labes']"),
        ("- {address: pod.example, port: 1}", "is not an IP address"),
        ("- {address: 127.0.0.2, port: 1}\n- {address: 127.0.0.2, port: 1}", "duplicate"),
        ("- {address: 127.0.0.2, port: 1, labels: {a: [1]}}", "scalar value"),
        ("- {address: 127.0.0.2, port: 1, ready: 'yes'}", "`ready` must be true or false"),
        ("- {address: 127.0.0.2, ports: []}", "non-empty list"),
        ("- 127.0.0.2:80", "must be a mapping"),
    ],
)
def test_file_errors_are_clear(text: str, message: str) -> None:
    with pytest.raises(EndpointsFileError, match=want_re(message)):
        parse_endpoints_yaml(text)


def test_endpoint_from_labels() -> None:
    k = LabelKeys()
    ep = endpoint_from_labels("10.0.0.1", 8000, "p", "ns", {"model": "m"}, True, k)
    assert (ep.key, ep.model, ep.business, ep.role, ep.engine) == (
        "10.0.0.1:8000",
        "m",
        "unassigned",
        ROLE_DECODE,
        "vllm",
    )
    ep = endpoint_from_labels(
        "10.0.0.1", 8000, "p", "ns", {"llm-d.ai/role": "prefill", "engine-type": "SGLang"}, True, k
    )
    assert (ep.role, ep.engine) == (ROLE_PREFILL, "sglang")
    both = {"role": "prefill-decode", "llm-d.ai/role": "prefill"}
    assert endpoint_from_labels("::1", 1, "", "", both, False, k).role == ROLE_BOTH  # `role` wins
    custom = LabelKeys(model="app/model", business="team", role="tier", engine="engine")
    ep = endpoint_from_labels(
        "10.0.0.2",
        9,
        "q",
        "",
        {"app/model": "x", "team": "t", "tier": "both", "engine": "sim"},
        False,
        custom,
        metrics_port=9100,
    )
    assert (ep.model, ep.business, ep.role, ep.engine, ep.ready) == (
        "x",
        "t",
        ROLE_BOTH,
        "sim",
        False,
    )
    assert ep.metrics_url == "http://10.0.0.2:9100/metrics"


# ---- the source with real files ------------------------------------------------------------
async def test_start_merges_flags_and_file(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(FILE_V1)
    ds = Datastore()
    src = StaticSource(
        ds,
        endpoints_file=str(path),
        endpoints=["127.0.0.4:8000", "127.0.0.2:8000"],
        default_labels={"model": "dflt", "business": "flagbiz"},
    )
    await src.start()
    try:
        assert ds.synced
        assert keys(ds) == {"127.0.0.2:8000", "127.0.0.3:8000", "127.0.0.3:8001", "127.0.0.4:8000"}
        flag = ds.get("127.0.0.4:8000")
        assert flag is not None and (flag.model, flag.business) == ("dflt", "flagbiz")
        a = ds.get("127.0.0.2:8000")  # in both: the file's entry wins, defaults fill the gaps
        assert a is not None and (a.name, a.business, a.metrics_port) == ("pod-a", "prod", 9100)
        b = ds.get("127.0.0.3:8001")
        assert b is not None
        assert (b.role, b.engine, b.ready, b.business) == (ROLE_PREFILL, "sglang", False, "flagbiz")
    finally:
        await src.stop()


async def test_flags_only_source_syncs() -> None:
    ds = Datastore()
    src = StaticSource(ds, endpoints=["127.0.0.5:8000,8001"])
    await src.start()
    await src.stop()
    assert ds.synced and keys(ds) == {"127.0.0.5:8000", "127.0.0.5:8001"}


async def test_start_fails_fast_on_missing_or_bad_file(tmp_path: Path) -> None:
    ds = Datastore()
    with pytest.raises(EndpointsFileError, match="does not exist"):
        await StaticSource(ds, endpoints_file=str(tmp_path / "nope.yaml")).start()
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {address: 127.0.0.2}\n")
    with pytest.raises(EndpointsFileError, match=r"bad\.yaml: endpoints\[0\]"):
        await StaticSource(ds, endpoints_file=str(bad)).start()
    assert not ds.synced and ds.endpoints() == ()


async def test_live_reload_keeps_endpoint_state(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(FILE_V1)
    ds = Datastore()
    src = StaticSource(ds, endpoints_file=str(path), poll_interval=0.02)
    await src.start()
    try:
        a = ds.get("127.0.0.2:8000")
        assert a is not None
        a.metrics.waiting = 5.0  # live state the data layer attached
        # Relabel pod-a, drop pod-b, add pod-c (written atomically, like kubectl/ConfigMaps do).
        tmp = tmp_path / "endpoints.yaml.tmp"
        tmp.write_text(
            "- {address: 127.0.0.2, port: 8000, name: pod-a, labels: {business: batch}}\n"
            "- {address: 127.0.0.6, port: 8000, name: pod-c}\n"
        )
        os.replace(tmp, path)
        await wait_for(lambda: keys(ds) == {"127.0.0.2:8000", "127.0.0.6:8000"})
        a2 = ds.get("127.0.0.2:8000")
        assert a2 is a and a.business == "batch" and a.metrics.waiting == 5.0
        assert src.reloads == 2 and src.last_error is None
    finally:
        await src.stop()


async def test_bad_edit_keeps_last_good_view(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(FILE_V1)
    ds = Datastore()
    src = StaticSource(ds, endpoints_file=str(path), poll_interval=0.02)
    await src.start()
    before = keys(ds)
    try:
        with caplog.at_level(logging.ERROR, logger="epp.datalayer.static_source"):
            path.write_text("- {address: 127.0.0.2, port: 8000, colour: red}\n")
            await wait_for(lambda: src.last_error is not None)
            await asyncio.sleep(0.1)  # several more polls: still one error for this version
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1
            assert "unknown key(s) ['colour']" in errors[0]
            assert "keeping the last good view (3 endpoints)" in errors[0]
            assert keys(ds) == before
            # A deleted file also keeps the view, with one error.
            path.unlink()
            await wait_for(lambda: any("missing" in r.getMessage() for r in caplog.records))
            assert keys(ds) == before
        path.write_text("endpoints:\n  - {address: 127.0.0.7, port: 8000}\n")
        await wait_for(lambda: keys(ds) == {"127.0.0.7:8000"})
        assert src.last_error is None
        ep = ds.get("127.0.0.7:8000")
        assert ep is not None and ep.name == "127.0.0.7:8000"  # default name
    finally:
        await src.stop()


async def test_edit_with_same_size_and_mtime_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text("- {address: 127.0.0.2, port: 8000, labels: {business: aaaa}}\n")
    ds = Datastore()
    src = StaticSource(ds, endpoints_file=str(path), poll_interval=60)  # we drive the polls
    await src.start()
    try:
        st = os.stat(path)
        overwrite_in_place(path, "- {address: 127.0.0.2, port: 8000, labels: {business: bbbb}}\n")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
        changed = [await src.check_file() for _ in range(6)]
        assert changed.count(True) == 1  # the periodic content hash caught it, once
        ep = ds.get("127.0.0.2:8000")
        assert ep is not None and ep.business == "bbbb"
    finally:
        await src.stop()


async def test_selector_and_target_ports(tmp_path: Path) -> None:
    """--endpoint-selector keeps only matching endpoints; --endpoint-target-ports gives bare
    IPs their ports."""
    f = tmp_path / "eps.yaml"
    f.write_text(
        "endpoints:\n"
        "- {address: 127.0.0.2, port: 8000, labels: {pool: a}}\n"
        "- {address: 127.0.0.3, port: 8000, labels: {pool: b}}\n"
    )
    ds = Datastore()
    src = StaticSource(
        ds, endpoints_file=str(f), endpoints=["127.0.0.9"], target_ports=[7000, 7001],
        default_labels={"pool": "a"}, selector={"pool": "a"},
    )  # fmt: skip
    await src.start()
    try:
        assert sorted(ep.key for ep in ds.endpoints()) == [
            "127.0.0.2:8000", "127.0.0.9:7000", "127.0.0.9:7001",
        ]  # fmt: skip
    finally:
        await src.stop()
