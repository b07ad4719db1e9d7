"""Process lifecycle: gRPC health services, /metrics, and graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.devstack.procs import free_port, stop_process, wait_http
from tests.integration.conftest import GatewayFactory, endpoint_dicts
from tests.integration.helpers import post

SERVICES = ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor")


async def _health(port: int) -> dict[str, int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        out = {}
        for svc in SERVICES:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=svc), timeout=2)
            out[svc] = resp.status
        return out


async def test_health_services_and_metrics(
    echo_pool: list[tuple[str, int]], tmp_path: Path
) -> None:
    eps = tmp_path / "endpoints.yaml"
    eps.write_text(f"endpoints:\n- {{address: 127.0.0.2, port: {echo_pool[0][1]}}}\n")
    grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "epp.cli", "serve", "--endpoints-file", str(eps),
         "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
         "--metrics-port", str(metrics_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        await wait_http(f"http://127.0.0.1:{metrics_port}/readyz", proc=proc)
        status = await _health(health_port)
        assert set(status.values()) == {health_pb2.HealthCheckResponse.SERVING}
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{metrics_port}/healthz") as r:
                assert r.status == 200
            async with s.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                text = await r.text()
        for name in ("inference_pool_ready_pods", "epp_inflight_requests",
                     "inference_extension_scheduler_e2e_duration_seconds"):
            assert name in text
        # an echo server reports no token latencies: the pod runs on the default priors
        key = f"127.0.0.2:{echo_pool[0][1]}"
        assert f'epp_endpoint_decode_ms_per_token{{endpoint="{key}",source="fleet"}} 12.0' in text
    finally:
        stop_process(proc)


async def test_sigterm_drains_open_streams(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    gw = await gateway(endpoint_dicts(echo_pool))
    slow = asyncio.create_task(post(gw, {"model": "m", "prompt": "x", "hold_ms": 2000}))
    await asyncio.sleep(0.5)
    epp = gw.epp_procs[0]
    epp.send_signal(signal.SIGTERM)
    status, _, raw = await slow
    assert status == 200, raw  # the open stream finished after the signal
    await asyncio.get_running_loop().run_in_executor(None, epp.wait, 30)
    assert epp.returncode == 0
