"""`make run`: a local gateway on the embedded standalone default.

Starts a small pool of simulated vLLM servers (epp.sim) on 127.0.0.2.., the EPP fed by
an endpoints file, and Envoy in front; prints where to send requests; stops everything on
Ctrl-C. `--check` sends a few requests through and exits (used by the tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from epp.devstack.procs import free_port, stop_process, wait_http
from epp.devstack.stack import GatewayHandle, start_gateway

BANNER = """
EPP gateway is up.

  Gateway (OpenAI API):  {url}
  EPP metrics:           {metrics}
  Endpoints file:        {endpoints}   (edit it: the EPP reloads it)
  Model:                 {model}
  Pool:                  {pool}

Try:
  curl -s {url}/v1/completions -H 'content-type: application/json' \\
    -d '{{"model": "{model}", "prompt": "Hello, my name is", "max_tokens": 16}}'
  curl -sN {url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "{model}", "stream": true, "messages": [{{"role": "user", "content": "Hi"}}]}}'

Ctrl-C stops everything.
"""


def _sim_cmd(args: argparse.Namespace, port: int) -> list[str]:
    return [
        sys.executable, "-m", "epp.sim", "--servers", str(args.servers),
        "--base-ip", args.base_ip, "--port", str(port), "--model", args.model,
        "--time-scale", str(args.time_scale),
    ]  # fmt: skip


def _ips(base: str, n: int) -> list[str]:
    head, last = base.rsplit(".", 1)
    return [f"{head}.{int(last) + i}" for i in range(n)]


async def _check(gw: GatewayHandle, model: str) -> None:
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            body = {"model": model, "prompt": f"Hello number {i}", "max_tokens": 4}
            async with s.post(f"{gw.url}/v1/completions", json=body) as r:
                text = await r.text()
                if r.status != 200:
                    raise RuntimeError(f"request {i}: HTTP {r.status}: {text}")
                print(f"check {i}: 200 from {r.headers.get('x-sim-server')}")


async def main_async(args: argparse.Namespace) -> int:
    port = free_port(args.base_ip)
    ips = _ips(args.base_ip, args.servers)
    log_path = Path(args.workdir or ".") / "sim.log" if args.workdir else None
    log = log_path.open("wb") if log_path else subprocess.DEVNULL
    sim = subprocess.Popen(
        _sim_cmd(args, port), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    gw: GatewayHandle | None = None
    try:
        for ip in ips:
            await wait_http(f"http://{ip}:{port}/health", proc=sim)
        endpoints = [
            {"address": ip, "port": port, "name": f"sim-{i}", "labels": {"model": args.model}}
            for i, ip in enumerate(ips)
        ]
        gw = await start_gateway(
            endpoints, listen_port=args.port, body_mode=args.body_mode, workdir=args.workdir
        )
        if args.check:
            await _check(gw, args.model)
            return 0
        print(
            BANNER.format(
                url=gw.url, metrics=gw.metrics_url, endpoints=gw.endpoints_file,
                model=args.model, pool=", ".join(f"{ip}:{port}" for ip in ips),
            ),
            flush=True,
        )  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("stopping...", flush=True)
        return 0
    finally:
        if gw is not None:
            gw.close()
        stop_process(sim)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8080, help="gateway port on 127.0.0.1")
    p.add_argument("--servers", type=int, default=3)
    p.add_argument("--base-ip", default="127.0.0.2")
    p.add_argument("--model", default="demo-llama-8b")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--body-mode", default="FULL_DUPLEX_STREAMED",
                   choices=["FULL_DUPLEX_STREAMED", "BUFFERED"])
    p.add_argument("--workdir", help="keep config and logs here (default: a temp dir)")
    p.add_argument("--check", action="store_true", help="send a few requests and exit")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
