"""`make run`: a local gateway on the embedded standalone default.

Starts a small pool of simulated vLLM servers (epp.sim) on 127.0.0.2.., the EPP fed by
an endpoints file, and Envoy in front; prints where to send requests; stops everything on
Ctrl-C. `--check` sends a few requests through and exits (used by the tests).
`--pd P:D` (`make run PD=1:2`) makes it a disaggregated pool: P prefill and D decode
simulators, an `epp sidecar` in front of each decode one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import yaml

from epp.devstack.procs import free_port, stop_process, wait_http
from epp.devstack.sidecars import SidecarHandle, pd_endpoints, start_sidecars, stop_sidecars
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

PD_BANNER = """P/D: prefill pods {prefill}; decode pods behind sidecars {sidecars}
  A long fresh prompt is prefilled on a prefill pod (response header x-epp-pd:
  disaggregated); a short or cached one stays on its decode pod (x-epp-pd: local).
  Sidecar metrics: {sidecar_metrics}
"""


def _sim_cmd(args: argparse.Namespace, port: int) -> list[str]:
    return [
        sys.executable, "-m", "epp.sim", "--servers", str(args.servers),
        "--base-ip", args.base_ip, "--port", str(port), "--model", args.model,
        "--time-scale", str(args.time_scale),
    ]  # fmt: skip


def _parse_pd(text: str) -> tuple[int, int]:
    p, _, d = text.partition(":")
    if not (p.isdigit() and d.isdigit()) or int(p) < 1 or int(d) < 1:
        raise argparse.ArgumentTypeError(f"--pd wants PREFILL:DECODE counts like 1:2, got {text!r}")
    return int(p), int(d)


def _pd_sim_config(args: argparse.Namespace, ips: list[str], port: int, path: Path) -> None:
    n_prefill = args.pd[0]
    servers = [
        {"host": ip, "port": port, "role": "prefill" if i < n_prefill else "decode"}
        for i, ip in enumerate(ips)
    ]
    defaults = {"model": args.model, "time_scale": args.time_scale}
    path.write_text(yaml.safe_dump({"defaults": defaults, "servers": servers}))


async def _check_pd(gw: GatewayHandle, model: str) -> None:
    """A long fresh prompt must be prefilled remotely; a short one stays local."""
    async with aiohttp.ClientSession() as s:
        for name, words, want in (("long", 1500, "disaggregated"), ("short", 8, "local")):
            prompt = " ".join(f"w{name}{i}" for i in range(words))
            body = {"model": model, "prompt": prompt, "max_tokens": 4}
            async with s.post(f"{gw.url}/v1/completions", json=body) as r:
                text = await r.text()
                mode = r.headers.get("x-epp-pd")
                if r.status != 200 or mode != want:
                    raise RuntimeError(f"{name} prompt: HTTP {r.status}, x-epp-pd={mode} "
                                       f"(want {want}): {text[:300]}")
                print(f"check {name}: 200 from {r.headers.get('x-sim-server')} x-epp-pd={mode}")


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
    n = sum(args.pd) if args.pd else args.servers
    ips = _ips(args.base_ip, n)
    tmp = tempfile.TemporaryDirectory(prefix="epp-demo-") if args.pd and not args.workdir else None
    workdir = Path(args.workdir or (tmp.name if tmp else "."))
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "sim.log" if args.workdir else None
    log = log_path.open("wb") if log_path else subprocess.DEVNULL
    cmd = _sim_cmd(args, port)
    if args.pd:
        _pd_sim_config(args, ips, port, workdir / "pool.yaml")
        cmd = [sys.executable, "-m", "epp.sim", "--config", str(workdir / "pool.yaml")]
    sim = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    gw: GatewayHandle | None = None
    sidecars: list[SidecarHandle] = []
    try:
        for ip in ips:
            await wait_http(f"http://{ip}:{port}/health", proc=sim)
        if args.pd:
            prefill = [(ip, port) for ip in ips[: args.pd[0]]]
            decode = [(ip, port) for ip in ips[args.pd[0] :]]
            sidecars = await start_sidecars(decode, prefill, workdir)
            endpoints = pd_endpoints(prefill, sidecars, {"model": args.model})
        else:
            endpoints = [
                {"address": ip, "port": port, "name": f"sim-{i}", "labels": {"model": args.model}}
                for i, ip in enumerate(ips)
            ]
        gw = await start_gateway(
            endpoints, listen_port=args.port, body_mode=args.body_mode, workdir=args.workdir
        )
        if args.check:
            await (_check_pd(gw, args.model) if args.pd else _check(gw, args.model))
            return 0
        print(
            BANNER.format(
                url=gw.url, metrics=gw.metrics_url, endpoints=gw.endpoints_file,
                model=args.model, pool=", ".join(f"{ip}:{port}" for ip in ips),
            ),
            flush=True,
        )  # fmt: skip
        if sidecars:
            print(PD_BANNER.format(
                prefill=", ".join(f"{ip}:{port}" for ip in ips[: args.pd[0]]),
                sidecars=", ".join(f"{sc.address} -> :{sc.engine[1]}" for sc in sidecars),
                sidecar_metrics=", ".join(sc.metrics_url for sc in sidecars),
            ), flush=True)  # fmt: skip
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
        stop_sidecars(sidecars)
        stop_process(sim)
        if tmp is not None:
            tmp.cleanup()


def _port_taken(host: str, port: int) -> str:
    """Why `port` cannot be the gateway's ("" = free). Envoy's own bind error is cryptic."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8080, help="gateway port on 127.0.0.1")
    p.add_argument("--servers", type=int, default=3,
                   help="simulated servers (default: %(default)s; ignored with --pd)")
    p.add_argument("--pd", type=_parse_pd, default=None, metavar="P:D",
                   help="P/D pool: P prefill and D decode servers, sidecars in front of the "
                        "decode ones (default: off; e.g. 1:2)")
    p.add_argument("--base-ip", default="127.0.0.2")
    p.add_argument("--model", default="demo-llama-8b")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--body-mode", default="FULL_DUPLEX_STREAMED",
                   choices=["FULL_DUPLEX_STREAMED", "BUFFERED"])
    p.add_argument("--workdir", help="keep config and logs here (default: a temp dir)")
    p.add_argument("--check", action="store_true", help="send a few requests and exit")
    args = p.parse_args(argv)
    busy = _port_taken("127.0.0.1", args.port)
    if busy:
        print(f"make run: cannot listen on 127.0.0.1:{args.port} ({busy}); another `make run` "
              f"or another server has it. Choose a free port: make run PORT={args.port + 1}",
              file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
