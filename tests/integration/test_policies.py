"""Platform policies through real processes: SLO attainment as the EPP observes it, and the
scheduling config reloaded from its file at run time (a bad file changes nothing)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import yaml

from epp.devstack.stack import GatewayHandle
from epp.scheduling.config import DEFAULT_CONFIG
from tests.integration.conftest import GatewayFactory, endpoint_dicts
from tests.integration.helpers import metric_samples, post, wait_inflight_zero


def total(text: str, name: str, **want: str) -> float:
    return sum(
        v
        for labels, v in metric_samples(text, name)
        if all(labels.get(k) == val for k, val in want.items())
    )


async def test_slo_attainment_per_business_from_the_observed_stream(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    labels = [{"business": "acme"}] * 2
    gw = await gateway(endpoint_dicts(echo_pool[:2], labels), response_body=True)
    body = {"model": "m", "prompt": "p " * 20, "stream": True, "n_chunks": 5, "chunk_ms": 30,
            "hold_ms": 150}  # fmt: skip
    easy = {"x-business": "acme", "x-slo-ttft-ms": "5000", "x-slo-tpot-ms": "1000"}
    hard = {"x-business": "acme", "x-slo-ttft-ms": "50", "x-slo-tpot-ms": "2"}
    for headers in (easy, easy, hard):
        status, _, _ = await post(gw, body, headers=headers)
        assert status == 200
    await post(gw, body)  # no SLO headers: not counted
    text = await gw.metrics_text()
    name = "epp_slo_requests_total"
    assert total(text, name, business="acme", slo="ttft", met="true") == 2
    assert total(text, name, business="acme", slo="ttft", met="false") == 1
    assert total(text, name, business="acme", slo="tpot", met="true") == 2
    assert total(text, name, business="acme", slo="tpot", met="false") == 1
    assert total(text, name) == 6


def flow_config() -> str:
    cfg = yaml.safe_load(DEFAULT_CONFIG)
    cfg["featureGates"] = ["flowControl"]
    cfg["flowControl"] = {
        "defaultPriorityBand": {
            "maxRequests": 1,
            "fairnessPolicyRef": "round-robin-fairness-policy",
        },
        "saturationDetector": {"maxConcurrency": 1, "queueDepthThreshold": 0},
    }
    return yaml.safe_dump(cfg)


async def wait_reloads(gw: GatewayHandle, result: str, n: int) -> None:
    deadline = time.monotonic() + 10
    while total(await gw.metrics_text(), "epp_config_reload_total", result=result) < n:
        assert time.monotonic() < deadline, f"no {result} reload seen"
        await asyncio.sleep(0.05)


async def test_config_file_reloaded_at_run_time_and_a_bad_one_is_refused(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory, tmp_path: Path
) -> None:
    path = tmp_path / "epp.yaml"
    path.write_text(DEFAULT_CONFIG)
    gw = await gateway(
        endpoint_dicts(echo_pool[:1]),
        epp_args=["--config-file", str(path), "--config-reload-interval", "0.05"],
    )
    hold = {"model": "m", "prompt": "hold " * 20, "hold_ms": 500}

    async def three_at_once() -> list[int]:
        tasks = []
        for _ in range(3):
            tasks.append(asyncio.create_task(post(gw, hold)))
            await asyncio.sleep(0.1)
        return sorted(r[0] for r in await asyncio.gather(*tasks))

    assert await three_at_once() == [200, 200, 200]  # no flow control: the pod queues them
    tmp = path.with_suffix(".tmp")
    tmp.write_text("plugins: [{type: no-such-scorer}]\n")
    tmp.replace(path)
    await wait_reloads(gw, "error", 1)
    assert await three_at_once() == [200, 200, 200]  # still the old config
    tmp.write_text(flow_config())
    tmp.replace(path)
    await wait_reloads(gw, "success", 1)
    # now one request per pod, one waiting in the EPP, the third refused
    assert await three_at_once() == [200, 200, 429]
    assert await wait_inflight_zero(gw) == 0
    text = await gw.metrics_text()
    assert total(text, "epp_config_reload_total", result="error") == 1
    log = (gw.workdir / "epp-0.log").read_text()
    assert "keeping the running config" in log and "no-such-scorer" in log
