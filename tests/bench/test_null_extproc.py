"""bench.proxy's ceiling run: Envoy + the do-nothing ext_proc server route real requests
(a server that answered the exchange wrongly would leave Envoy without a destination: 5xx)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson
import pytest

from bench.proxy import BACKEND_IPS, COMPLETION, backend_config, null_gateway
from epp.devstack.envoy import start_envoy
from epp.devstack.procs import free_port, stop_process, wait_http


@pytest.mark.parametrize("body_mode", ["FULL_DUPLEX_STREAMED", "BUFFERED"])
async def test_envoy_and_null_extproc_answer_every_request(tmp_path: Path, body_mode: str) -> None:
    port = free_port()
    backend = start_envoy(backend_config(port, free_port()), tmp_path / "backend", concurrency=1)
    try:
        for ip in BACKEND_IPS:
            await wait_http(f"http://{ip}:{port}/health", proc=backend)
        body = orjson.dumps({"model": "bench", "prompt": "x" * 3000, "max_tokens": 8})
        null = null_gateway(port, tmp_path / "null", body_mode=body_mode)
        async with null as url, aiohttp.ClientSession() as s:
            for _ in range(8):
                async with s.post(url, data=body) as r:
                    assert r.status == 200, await r.text()
                    assert await r.text() == COMPLETION
    finally:
        stop_process(backend)
