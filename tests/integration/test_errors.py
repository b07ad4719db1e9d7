"""Errors reach the client as OpenAI-style JSON with the right status, through Envoy."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.integration.conftest import GatewayFactory, endpoint_dicts
from tests.integration.helpers import post, wait_inflight_zero

MODES = ["FULL_DUPLEX_STREAMED", "BUFFERED"]


def _error(raw: bytes) -> dict[str, str]:
    err = orjson.loads(raw)["error"]
    assert set(err) >= {"message", "type", "code"}
    return dict(err)


@pytest.mark.parametrize("mode", MODES)
async def test_400_bad_json_missing_model_wrong_types(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory, mode: str
) -> None:
    gw = await gateway(endpoint_dicts(echo_pool), body_mode=mode)
    cases: list[tuple[bytes | dict[str, object], str, str]] = [
        (b"{not json", "/v1/completions", "invalid_json"),
        ({"prompt": "x"}, "/v1/completions", "missing_model"),
        ({"model": 7, "prompt": "x"}, "/v1/completions", "invalid_model"),
        ({"model": "m", "prompt": "x", "max_tokens": "ten"}, "/v1/completions", "invalid_type"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "/v1/completions", "invalid_type"),
        ({"model": "m", "messages": "hi"}, "/v1/chat/completions", "invalid_messages"),
        (b"[1,2]", "/v1/completions", "invalid_body"),
    ]
    for body, path, code in cases:
        status, headers, raw = await post(gw, body, path=path)
        assert status == 400, (body, raw)
        assert headers["content-type"] == "application/json"
        assert _error(raw)["code"] == code


@pytest.mark.parametrize("mode", MODES)
async def test_404_unknown_model(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory, mode: str
) -> None:
    labels = [{"model": "llama"}] * len(echo_pool)
    gw = await gateway(endpoint_dicts(echo_pool, labels), body_mode=mode)
    status, _, raw = await post(gw, {"model": "gpt-9", "prompt": "x"})
    assert status == 404
    assert _error(raw)["code"] == "model_not_found"
    status, _, _ = await post(gw, {"model": "llama", "prompt": "x"})
    assert status == 200


@pytest.mark.parametrize("mode", MODES)
async def test_413_body_over_limit(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory, mode: str
) -> None:
    gw = await gateway(
        endpoint_dicts(echo_pool), body_mode=mode, epp_args=["--max-body-bytes", "100000"]
    )
    status, _, raw = await post(gw, {"model": "m", "prompt": "x" * 200_000})
    assert status == 413, raw[:200]
    assert _error(raw)["code"] == "request_too_large"
    status, _, _ = await post(gw, {"model": "m", "prompt": "x" * 50_000})
    assert status == 200


async def test_503_when_no_endpoint_is_ready(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    eps = endpoint_dicts(echo_pool)
    for e in eps:
        e["ready"] = False
    gw = await gateway(eps)
    status, _, raw = await post(gw, {"model": "m", "prompt": "x"})
    assert status == 503
    assert _error(raw)["code"] == "no_healthy_upstream"


async def test_429_sheddable_when_saturated(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory, tmp_path: Path
) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("objectives:\n- name: batch\n  priority: -1\n")
    gw = await gateway(
        endpoint_dicts(echo_pool[:1]),
        epp_args=["--models-file", str(models), "--max-inflight-per-endpoint", "1"],
    )
    slow = asyncio.create_task(post(gw, {"model": "m", "prompt": "x", "hold_ms": 1500}))
    await asyncio.sleep(0.5)  # the slow request occupies the only endpoint
    status, _, raw = await post(
        gw, {"model": "m", "prompt": "y"}, headers={"x-gateway-inference-objective": "batch"}
    )
    assert status == 429
    assert _error(raw)["code"] == "rate_limit_exceeded"
    # A request that is not sheddable is still served (queued by the engine).
    status, _, _ = await post(gw, {"model": "m", "prompt": "z"})
    assert status == 200
    assert (await slow)[0] == 200
    assert await wait_inflight_zero(gw) == 0
    async with aiohttp.ClientSession() as s, s.get(gw.metrics_url) as r:
        text = await r.text()
    assert 'error_code="rate_limit_exceeded"' in text
