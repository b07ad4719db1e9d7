"""bench.proxy's ceiling run: Envoy + the do-nothing ext_proc server route real requests
(a server that answered the exchange wrongly would leave Envoy without a destination: 5xx)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson

from bench.proxy import BACKEND_IPS, COMPLETION, backend_config, wait_tcp
from epp.datalayer.eds_file import write_eds
from epp.devstack.envoy import EnvoyOptions, render_envoy_config, start_envoy
from epp.devstack.procs import free_port, stop_process, wait_http


async def test_envoy_and_null_extproc_answer_every_request(tmp_path: Path) -> None:
    port = free_port()
    backend = start_envoy(backend_config(port, free_port()), tmp_path / "backend", concurrency=1)
    grpc_port = free_port()
    endpoints = ",".join(f"{ip}:{port}" for ip in BACKEND_IPS)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.null_extproc",
            "--port",
            str(grpc_port),
            "--endpoints",
            endpoints,
        ],
        start_new_session=True,
    )
    gateway = None
    try:
        for ip in BACKEND_IPS:
            await wait_http(f"http://{ip}:{port}/health", proc=backend)
        await wait_tcp(grpc_port, server)
        eds = tmp_path / "eds" / "pool.yaml"
        eds.parent.mkdir()
        write_eds(eds, "pool", [(ip, port) for ip in BACKEND_IPS])
        opts = EnvoyOptions(
            listen_port=free_port(), admin_port=free_port(), epp_ports=[grpc_port],
            response_headers=True, eds_path=str(eds),
        )  # fmt: skip
        gateway = start_envoy(render_envoy_config(opts), tmp_path / "gw", concurrency=1)
        await wait_http(f"http://127.0.0.1:{opts.admin_port}/ready", proc=gateway)
        url = f"http://127.0.0.1:{opts.listen_port}/v1/completions"
        body = orjson.dumps({"model": "bench", "prompt": "x" * 3000, "max_tokens": 8})
        async with aiohttp.ClientSession() as s:
            for _ in range(8):
                async with s.post(url, data=body) as r:
                    assert r.status == 200, await r.text()
                    assert await r.text() == COMPLETION
    finally:
        stop_process(gateway)
        stop_process(server)
        stop_process(backend)
