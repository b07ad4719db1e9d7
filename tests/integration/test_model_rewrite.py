"""InferenceModel-style rewrite (standalone models file): the body is rewritten for the model
server, and the client gets its own model name back, for JSON and SSE answers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.integration.conftest import GatewayFactory, endpoint_dicts
from tests.integration.helpers import post, wait_inflight_zero

MODELS = """
models:
- name: chat
  criticality: Standard
  targetModels:
  - {name: llama-a, weight: 3}
  - {name: llama-b, weight: 1}
"""


# BUFFERED: the EPP turns response-body processing on for rewritten requests only
# (mode_override). FULL_DUPLEX_STREAMED: Envoy 1.40 ignores mode_override, so the gateway
# must send response bodies to the EPP for the name to be restored.
SETUPS = [
    pytest.param({"body_mode": "BUFFERED"}, id="buffered-mode-override"),
    pytest.param(
        {"body_mode": "FULL_DUPLEX_STREAMED", "response_body": True}, id="full-duplex-with-body"
    ),
]


@pytest.mark.parametrize("setup", SETUPS)
async def test_weighted_rewrite_and_name_restored(
    echo_pool: list[tuple[str, int]],
    gateway: GatewayFactory,
    tmp_path: Path,
    setup: dict[str, Any],
) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    gw = await gateway(endpoint_dicts(echo_pool), epp_args=["--models-file", str(models)], **setup)
    received: Counter[str] = Counter()
    for i in range(40):
        status, headers, raw = await post(gw, {"model": "chat", "prompt": f"q{i}"})
        assert status == 200, raw
        info = orjson.loads(raw)
        received[info["received_model"]] += 1
        # The re-encoded body reached the model server whole (Envoy may send it chunked
        # instead of with a content-length; if there is one, it must agree)...
        assert info["headers"].get("content-length", str(info["body_len"])) == str(info["body_len"])
        # ...and the client sees the name it asked for, with a consistent length.
        assert info["model"] == "chat"
        assert int(headers.get("content-length", len(raw))) == len(raw)
    assert set(received) == {"llama-a", "llama-b"}
    assert 20 <= received["llama-a"] <= 38, received  # weights 3:1

    body = {"model": "chat", "prompt": "s", "stream": True, "n_chunks": 3, "chunk_ms": 10}
    async with aiohttp.ClientSession() as s, s.post(gw.url + "/v1/completions", json=body) as r:
        text = (await r.read()).decode()
    assert r.status == 200
    assert text.count('"model":"chat"') == 3
    assert "llama-" not in text
    assert await wait_inflight_zero(gw) == 0
