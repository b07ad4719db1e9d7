"""Flow control through a real Envoy: requests wait in the EPP while every pod is at its
limit and go when one frees; a full band answers 429 with retry-after; a client that
disconnects while queued leaves the queue and leaks nothing."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest
import yaml

from epp.devstack.stack import GatewayHandle
from epp.scheduling.config import DEFAULT_CONFIG
from tests.integration.conftest import GatewayFactory, endpoint_dicts
from tests.integration.helpers import metric_samples, post, wait_inflight_zero

MODES = ["FULL_DUPLEX_STREAMED", "BUFFERED"]


def flow_config(band_max: int = 100) -> str:
    cfg = yaml.safe_load(DEFAULT_CONFIG)
    cfg["featureGates"] = ["flowControl"]
    cfg["flowControl"] = {
        "defaultRequestTTL": "20s",
        # round robin: the default work fairness never holds a lone tenant
        "defaultPriorityBand": {
            "maxRequests": band_max,
            "fairnessPolicyRef": "round-robin-fairness-policy",
        },
        # one request in flight per pod: the second one waits in the EPP
        "saturationDetector": {"maxConcurrency": 1, "queueDepthThreshold": 0},
    }
    return yaml.safe_dump(cfg)


def counts(text: str, name: str, **want: str) -> float:
    return sum(
        v
        for labels, v in metric_samples(text, name)
        if all(labels.get(k) == val for k, val in want.items())
    )


async def until(gw: GatewayHandle, name: str, value: float, timeout: float = 10.0) -> str:
    """Poll the EPP's metrics until `name` sums to `value`; returns that scrape."""
    deadline = time.monotonic() + timeout
    while True:
        text = await gw.metrics_text()
        if counts(text, name) == value:
            return text
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("mode", MODES)
async def test_requests_wait_in_the_epp_then_go_as_pods_free(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory, mode: str
) -> None:
    gw = await gateway(endpoint_dicts(echo_pool[:2]), config_text=flow_config(), body_mode=mode)
    hold_ms = 1000
    started = time.monotonic()

    async def one(i: int) -> tuple[int, float, str]:
        status, _, raw = await post(
            gw, {"model": "m", "prompt": f"request {i} " * 20, "hold_ms": hold_ms}
        )
        return status, time.monotonic() - started, orjson.loads(raw).get("served_by", "")

    tasks = [asyncio.create_task(one(i)) for i in range(4)]
    # two are held by the pods, two wait in the EPP
    text = await until(gw, "epp_flow_control_queue_size", 2)
    assert counts(text, "epp_inflight_requests") == 2
    results = await asyncio.gather(*tasks)
    assert [s for s, _, _ in results] == [200] * 4
    # never more than one request per pod at a time: the queued pair ends a hold later
    ends = sorted(t for _, t, _ in results)
    assert ends[2] >= 2 * hold_ms / 1000 - 0.05, ends
    assert {served for _, _, served in results} == {f"{ip}:{p}" for ip, p in echo_pool[:2]}
    text = await gw.metrics_text()
    assert (
        counts(text, "epp_flow_control_requests_total", outcome="dispatched", reason="queued") == 2
    )
    assert (
        counts(text, "epp_flow_control_requests_total", outcome="dispatched", reason="immediate")
        == 2
    )
    assert counts(text, "epp_flow_control_queue_wait_seconds_count", outcome="dispatched") == 4
    assert counts(text, "epp_flow_control_queue_size") == 0
    assert await wait_inflight_zero(gw) == 0


async def test_full_band_answers_429_with_retry_after(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    gw = await gateway(endpoint_dicts(echo_pool[:1]), config_text=flow_config(band_max=1))
    body = {"model": "m", "prompt": "hold " * 20, "hold_ms": 1000}
    held = asyncio.create_task(post(gw, body))
    await until(gw, "epp_inflight_requests", 1)
    queued = asyncio.create_task(post(gw, body))
    await until(gw, "epp_flow_control_queue_size", 1)
    status, headers, raw = await post(gw, body)
    assert status == 429
    assert int(headers["retry-after"]) >= 1
    err = orjson.loads(raw)["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    assert (await held)[0] == 200 and (await queued)[0] == 200
    text = await gw.metrics_text()
    assert (
        counts(text, "epp_flow_control_requests_total", outcome="rejected", reason="band_full") == 1
    )


@pytest.mark.parametrize("mode", MODES)
async def test_client_disconnect_while_queued_leaves_nothing_behind(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory, mode: str
) -> None:
    gw = await gateway(endpoint_dicts(echo_pool[:1]), config_text=flow_config(), body_mode=mode)
    held = asyncio.create_task(post(gw, {"model": "m", "prompt": "long " * 20, "hold_ms": 2000}))
    await until(gw, "epp_inflight_requests", 1)
    # This one waits in the EPP; its client gives up after 0.5 s.
    timeout = aiohttp.ClientTimeout(total=0.5)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        with pytest.raises(asyncio.TimeoutError):
            async with s.post(
                gw.url + "/v1/completions",
                data=orjson.dumps({"model": "m", "prompt": "impatient " * 20}),
                headers={"content-type": "application/json"},
            ) as r:
                await r.read()
    deadline = time.monotonic() + 5
    while True:
        text = await gw.metrics_text()
        if counts(text, "epp_flow_control_requests_total", outcome="cancelled") == 1:
            break
        assert time.monotonic() < deadline, "the EPP never saw the client leave the queue"
        await asyncio.sleep(0.1)
    assert counts(text, "epp_flow_control_queue_size") == 0
    assert (await held)[0] == 200
    assert await wait_inflight_zero(gw) == 0
    text = await gw.metrics_text()
    # the cancelled request was never picked: one pick, and the pod is free for the next
    assert counts(text, "epp_endpoint_picks_total") == 1
    status, _, _ = await post(gw, {"model": "m", "prompt": "after"})
    assert status == 200
    assert await wait_inflight_zero(gw) == 0
