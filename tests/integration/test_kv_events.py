"""An engine's cache reset, seen through its KV-event publisher, clears the EPP's prefix
guesses for that pod (real simulator publishing over ZMQ, real EPP + Envoy)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import aiohttp

from epp.devstack.procs import free_port, stop_process, wait_http
from tests.integration.conftest import ROOT, GatewayFactory
from tests.integration.helpers import metric_samples, post

IP = "127.0.9.2"


async def test_cache_reset_event_clears_prefix_index(gateway: GatewayFactory) -> None:
    port, kv_port = free_port(IP), free_port(IP)
    sim = subprocess.Popen(
        [sys.executable, "-m", "epp.sim", "--servers", "1", "--base-ip", IP, "--port", str(port),
         "--model", "m", "--time-scale", "0.1", "--kv-events-port", str(kv_port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        await wait_http(f"http://{IP}:{port}/health", proc=sim)
        gw = await gateway(
            [{"address": IP, "port": port, "labels": {"model": "m"}}],
            epp_args=["--kv-events-port", str(kv_port)],
        )
        for i in range(3):
            status, _, raw = await post(gw, {"model": "m", "prompt": f"p{i} " * 200, "max_tokens": 2})
            assert status == 200, raw
        await asyncio.sleep(0.5)  # the subscriber is connected and the engine is idle
        async with aiohttp.ClientSession() as s, s.post(f"http://{IP}:{port}/sim/reset") as r:
            assert r.status == 200, await r.text()
        deadline = time.monotonic() + 10
        resets = 0.0
        while time.monotonic() < deadline and resets < 1:
            samples = metric_samples(await gw.metrics_text(), "epp_kv_cache_resets_total")
            resets = sum(v for labels, v in samples if labels["endpoint"] == f"{IP}:{port}")
            await asyncio.sleep(0.1)
        assert resets == 1
    finally:
        stop_process(sim)
