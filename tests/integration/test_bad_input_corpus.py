"""A corpus of bad bodies and headers through real Envoy + the EPP + simulator pods: every
case gets a 4xx or is served (200), the EPP stays up, nothing stays in flight, and the
cases the EPP owns (bad token ids, empty bodies, over-long prompts) never reach a pod."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import orjson
import pytest

from tests.integration.conftest import SIM_MODEL, GatewayFactory, endpoint_dicts
from tests.integration.helpers import metric_samples, wait_inflight_zero

M = SIM_MODEL
MAX_MODEL_LEN = 32_768  # what the simulator reports on /v1/models

# (path, body, extra headers, the EPP's own error code or None = any 4xx/200 will do)
CORPUS: list[tuple[str, bytes | dict[str, Any], dict[str, str], str | None]] = [
    ("/v1/completions", {"model": M, "prompt": [1, -1, 2]}, {}, "invalid_token_id"),
    ("/v1/completions", {"model": M, "prompt": [[1, 2], [-3]]}, {}, "invalid_token_id"),
    ("/v1/completions", {"model": M, "prompt": [1 << 31]}, {}, "invalid_token_id"),
    ("/v1/embeddings", {"model": M, "input": [-7]}, {}, "invalid_token_id"),
    ("/v1/completions", b"", {}, "invalid_body"),
    ("/v1/chat/completions", b"", {}, "invalid_body"),
    ("/v1/completions", {"model": M, "prompt": [1] * (MAX_MODEL_LEN + 1)}, {},
     "context_length_exceeded"),
    ("/v1/completions", {"model": M, "prompt": [1] * 100, "max_tokens": MAX_MODEL_LEN}, {},
     "context_length_exceeded"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "x" * 300_000}]},
     {}, "context_length_exceeded"),
    ("/v1/completions", b"{not json", {}, "invalid_json"),
    ("/v1/completions", b"[1,2]", {}, "invalid_body"),
    ("/v1/completions", b"null", {}, "invalid_body"),
    ("/v1/completions", b"\xff\xfe\x00", {}, "invalid_json"),
    ("/v1/completions", json.dumps({"model": M, "prompt": [1 << 70]}).encode(), {}, "invalid_request"),
    ("/v1/completions", {"prompt": "x"}, {}, "missing_model"),
    ("/v1/completions", {"model": ["m"], "prompt": "x"}, {}, "invalid_model"),
    ("/v1/completions", {"model": M}, {}, "missing_prompt"),
    ("/v1/completions", {"model": M, "prompt": []}, {}, "invalid_request"),
    ("/v1/completions", {"model": M, "prompt": [True]}, {}, "invalid_request"),
    ("/v1/completions", {"model": M, "prompt": {"a": 1}}, {}, "invalid_request"),
    ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": -1}, {}, "invalid_value"),
    ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": "9"}, {}, "invalid_type"),
    ("/v1/completions", {"model": M, "prompt": "x", "stream": "yes"}, {}, "invalid_type"),
    ("/v1/chat/completions", {"model": M, "messages": []}, {}, "invalid_messages"),
    ("/v1/chat/completions", {"model": M, "messages": [{"content": "x"}]}, {}, "invalid_messages"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": 5}]}, {},
     "invalid_request"),
    ("/v1/chat/completions",
     {"model": M, "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, {},
     "invalid_request"),
    ("/v1/responses", {"model": M}, {}, "missing_input"),
    ("/v1/responses", {"model": M, "input": "x", "instructions": 3}, {}, "invalid_request"),
    ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, {}, None),
    # control headers with junk values: ignored or rejected, never a crash
    ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 2},
     {"x-slo-ttft-ms": "nan", "x-slo-tpot-ms": "-inf"}, None),
    ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 2},
     {"x-gateway-inference-objective": "\u00e9" * 50, "x-business": ""}, None),
    ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 2},
     {"x-gateway-model-name-rewrite": "other-model"}, None),
    ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 2},
     {"x-session-id": "s" * 4000, "x-request-id": "\t"}, None),
    ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 2},
     {"x-gateway-destination-endpoint": "10.9.9.9:1", "x-prefiller-host-port": "10.9.9.9:1"},
     None),
    ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 2, "user": 5}, {}, None),
    ("/v1/completions", {"model": M, "prompt": ["a", "b"], "max_tokens": 2}, {}, None),
    ("/v1/chat/completions",
     {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
      "stream": True, "stream_options": {"include_usage": True}}, {}, None),
    ("/v1/completions", {"model": M, "prompt": "\u0000\ud7ff\ue000", "max_tokens": 2}, {}, None),
    ("/v1/models", b"", {}, None),
]  # fmt: skip


async def sim_requests(pool: list[tuple[str, int]]) -> int:
    total = 0
    async with aiohttp.ClientSession() as s:
        for ip, port in pool:
            async with s.get(f"http://{ip}:{port}/sim/state") as r:
                total += int((await r.json())["requests_total"])
    return total


async def send(
    gw_url: str, path: str, body: bytes | dict[str, Any], headers: dict[str, str]
) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    method = "GET" if path == "/v1/models" else "POST"
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, gw_url + path, data=data, headers=headers) as r,
    ):
        return r.status, await r.read()


@pytest.mark.parametrize("mode", ["FULL_DUPLEX_STREAMED", "BUFFERED"])
async def test_bad_input_corpus_through_envoy(
    sim_pool: list[tuple[str, int]], gateway: GatewayFactory, mode: str
) -> None:
    gw = await gateway(endpoint_dicts(sim_pool), body_mode=mode)
    # The EPP learns the pool's context window from /v1/models shortly after start.
    for _ in range(50):
        status, raw = await send(
            gw.url, "/v1/completions", {"model": M, "prompt": [1] * (MAX_MODEL_LEN + 1)}, {}
        )
        if status == 400 and b"context_length_exceeded" in raw:
            break
        await asyncio.sleep(0.1)
    for path, body, headers, code in CORPUS:
        before = await sim_requests(sim_pool) if code is not None else 0
        status, raw = await send(gw.url, path, body, headers)
        case = (path, str(body)[:80], headers)
        assert status == 200 or 400 <= status < 500, (case, status, raw[:200])
        if code is not None:
            assert status == 400, (case, status, raw[:200])
            assert orjson.loads(raw)["error"]["code"] == code, (case, raw[:200])
            assert await sim_requests(sim_pool) == before, f"{case} reached a pod"
    healthz = gw.metrics_url.replace("/metrics", "/healthz")
    async with aiohttp.ClientSession() as s, s.get(healthz) as r:
        assert r.status == 200  # the EPP is alive
    assert await wait_inflight_zero(gw) == 0
    open_requests = metric_samples(await gw.metrics_text(), "epp_open_requests")
    assert open_requests and open_requests[0][1] == 0
