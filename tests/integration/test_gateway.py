"""End to end through a real Envoy: the picked endpoint serves, in both body modes."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter

import aiohttp
import orjson
import pytest

from tests.integration.conftest import SIM_MODEL, GatewayFactory, endpoint_dicts
from tests.integration.helpers import metric_samples, post, wait_inflight_zero

MODES = ["FULL_DUPLEX_STREAMED", "BUFFERED"]


@pytest.mark.parametrize("mode", MODES)
async def test_picked_endpoint_serves_and_body_arrives_intact(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory, mode: str
) -> None:
    gw = await gateway(endpoint_dicts(echo_pool), body_mode=mode)
    picks_before = metric_samples(await gw.metrics_text(), "epp_endpoint_picks_total")
    assert not picks_before
    body = orjson.dumps({"model": "m", "prompt": "hello " * 50, "max_tokens": 3})
    status, _headers, raw = await post(gw, body)
    assert status == 200, raw
    info = orjson.loads(raw)
    assert info["body_sha256"] == hashlib.sha256(body).hexdigest()
    picks = metric_samples(await gw.metrics_text(), "epp_endpoint_picks_total")
    picked = [labels["endpoint"] for labels, v in picks if v == 1 and labels["role"] == "decode"]
    assert picked == [info["served_by"]]
    # The target first, then the fallbacks the gateway would retry on.
    dest = info["headers"]["x-gateway-destination-endpoint"].split(",")
    assert dest[0] == info["served_by"] and len(dest) == len(set(dest)) == 3


@pytest.mark.parametrize("mode", MODES)
async def test_two_megabyte_body(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory, mode: str
) -> None:
    gw = await gateway(endpoint_dicts(echo_pool), body_mode=mode)
    prompt = "the quick brown fox " * (2_000_000 // 20)
    body = orjson.dumps({"model": "m", "prompt": prompt})
    assert len(body) > 2_000_000
    status, _, raw = await post(gw, body)
    assert status == 200, raw[:300]
    info = orjson.loads(raw)
    assert info["body_len"] == len(body)
    assert info["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_control_and_spoofed_headers_do_not_reach_the_model_server(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    # Only three of the four backends are in the pool; the client names the fourth.
    gw = await gateway(endpoint_dicts(echo_pool[:3]))
    spoofed = f"{echo_pool[3][0]}:{echo_pool[3][1]}"
    seen = set()
    for i in range(8):
        status, _, raw = await post(
            gw,
            {"model": "m", "prompt": f"unique prompt {i} " * 30},
            headers={
                "x-gateway-destination-endpoint": spoofed,
                "x-prefiller-host-port": "10.9.9.9:1",
                "x-business": "",
                "x-gateway-inference-objective": "whatever",
                "x-slo-ttft-ms": "500",
            },
        )
        assert status == 200
        info = orjson.loads(raw)
        seen.add(info["served_by"])
        h = info["headers"]
        assert h["x-gateway-destination-endpoint"].split(",")[0] == info["served_by"]
        for name in ("x-prefiller-host-port", "x-gateway-inference-objective", "x-slo-ttft-ms"):
            assert name not in h, name
    assert spoofed not in seen


async def test_same_prefix_goes_to_same_endpoint(
    sim_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    gw = await gateway(endpoint_dicts(sim_pool))
    system = "You are a helpful assistant for the accounting team. " * 40
    servers: dict[int, set[str]] = {}
    for group in range(3):
        for user in range(4):
            body = {
                "model": SIM_MODEL,
                "messages": [
                    {"role": "system", "content": f"group {group}: " + system},
                    {"role": "user", "content": f"question {user}?"},
                ],
                "max_tokens": 2,
            }
            status, headers, raw = await post(gw, body, path="/v1/chat/completions")
            assert status == 200, raw
            servers.setdefault(group, set()).add(headers["x-sim-server"])
    for group, s in servers.items():
        assert len(s) == 1, f"group {group} was spread over {s}"


async def test_concurrent_load_spreads(
    sim_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    gw = await gateway(endpoint_dicts(sim_pool))
    n = 12

    async def one(i: int) -> str:
        body = {"model": SIM_MODEL, "prompt": f"{i} distinct prompt " * 20, "max_tokens": 40}
        status, headers, raw = await post(gw, body)
        assert status == 200, raw
        return headers["x-sim-server"]

    served = Counter(await asyncio.gather(*(one(i) for i in range(n))))
    assert len(served) == len(sim_pool)
    assert max(served.values()) - min(served.values()) <= 2, served
    assert await wait_inflight_zero(gw) == 0


async def test_business_header_restricts_pods(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    labels = [
        {"business": "prod"},
        {"business": "prod"},
        {"business": "test"},
        {"business": "unassigned"},
    ]
    gw = await gateway(endpoint_dicts(echo_pool, labels))
    prod = {
        f"{ip}:{port}"
        for (ip, port), lb in zip(echo_pool, labels, strict=True)
        if lb["business"] == "prod"
    }
    for i in range(10):
        status, _, raw = await post(
            gw, {"model": "m", "prompt": f"p{i} " * 40}, headers={"x-business": "prod"}
        )
        assert status == 200
        info = orjson.loads(raw)
        assert info["served_by"] in prod
        assert "x-business" not in info["headers"]
    status, _, raw = await post(gw, {"model": "m", "prompt": "x"}, headers={"x-business": "nobody"})
    assert status == 503, raw
    assert orjson.loads(raw)["error"]["code"] == "no_healthy_upstream"


async def test_prefill_header_set_when_prefill_pods_exist(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    labels = [{"role": "decode"}, {"role": "decode"}, {"role": "prefill"}, {"role": "prefill"}]
    gw = await gateway(endpoint_dicts(echo_pool, labels))
    decode = {
        f"{ip}:{p}" for (ip, p), lb in zip(echo_pool, labels, strict=True) if lb["role"] == "decode"
    }
    prefill = {
        f"{ip}:{p}"
        for (ip, p), lb in zip(echo_pool, labels, strict=True)
        if lb["role"] == "prefill"
    }
    # A long fresh prompt: worth a prefill hop.
    status, _, raw = await post(gw, {"model": "m", "prompt": "long fresh prompt " * 2000})
    assert status == 200
    info = orjson.loads(raw)
    assert info["served_by"] in decode
    assert info["headers"]["x-prefiller-host-port"] in prefill
    # A tiny prompt: not worth the hop, decoded locally with no prefill header.
    status, _, raw = await post(gw, {"model": "m", "prompt": "hi"})
    info = orjson.loads(raw)
    assert info["served_by"] in decode
    assert "x-prefiller-host-port" not in info["headers"]


async def test_sse_stream_passes_chunk_by_chunk(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    gw = await gateway(endpoint_dicts(echo_pool))
    body = {"model": "m", "prompt": "x", "stream": True, "n_chunks": 6, "chunk_ms": 150}
    arrivals: list[float] = []
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s, s.post(gw.url + "/v1/completions", json=body) as r:
        assert r.status == 200
        async for _chunk in r.content.iter_any():
            arrivals.append(time.monotonic() - t0)
    # Chunks arrive spread over the ~0.9 s the backend takes, not all at the end.
    assert len(arrivals) >= 5
    assert arrivals[0] < 0.5
    assert arrivals[-1] - arrivals[0] > 0.5
    assert await wait_inflight_zero(gw) == 0


async def test_aborted_streams_release_inflight(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    gw = await gateway(endpoint_dicts(echo_pool))
    body = {"model": "m", "prompt": "x", "stream": True, "n_chunks": 50, "chunk_ms": 100}

    async def abort_midway() -> None:
        async with (
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/completions", json=body) as r,
        ):
            await r.content.readany()  # first chunk arrived: the stream is live
            r.close()  # client goes away mid-stream

    async def abort_before_response() -> None:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(asyncio.TimeoutError):
                await s.post(
                    gw.url + "/v1/completions",
                    json={"model": "m", "prompt": "y", "hold_ms": 3000},
                    timeout=aiohttp.ClientTimeout(total=0.3),
                )

    await asyncio.gather(
        *(abort_midway() for _ in range(5)), *(abort_before_response() for _ in range(3))
    )
    assert await wait_inflight_zero(gw, timeout=15) == 0


async def test_subset_hint_is_not_required_and_get_requests_route(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    gw = await gateway(endpoint_dicts(echo_pool))
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/v1/models") as r:
        assert r.status == 200
        info = orjson.loads(await r.read())
        assert info["served_by"] in {f"{ip}:{p}" for ip, p in echo_pool}
