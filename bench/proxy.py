"""Proxy-overhead benchmark: plain Envoy round-robin vs Envoy + EPP vs the peer routers,
same backends, same run.

    python -m bench.proxy [--json] [--duration S] [--connections N] [--rounds R]
                          [--epp-processes N] [--workers N] [--peers vllm-router:cache_aware,...]

Backends are near-instant (an Envoy answering every POST with a fixed completion via
`direct_response`, on four loopback IPs) so the figures are the routers' own cost. Load is
`wrk` (Debian package; installed by `make bench` if missing). Every setup runs for the
whole measurement and is measured in `--rounds` interleaved rounds (each round starts one
setup later), so that a slow spell of a shared machine lands on all of them; figures are
medians over the rounds, with 95% bootstrap intervals of the median (3 rounds or more).
Prints one JSON object:

* machine_loop_ms: how fast this machine runs plain Python (`bench.machine`), to tell
  whether two runs' absolute figures are comparable;
* plain_envoy_rps / epp_rps / ratio: throughput at `--connections` concurrency (ratio:
  the median of the per-round EPP / plain ratios); `*_rps_rounds`: every round's figure;
* added_p50_ms_c1: p50 latency added by the EPP with one connection (small body);
* large_body_added_ms: the same for a 220 KB prompt;
* null_extproc: the same for Envoy + a do-nothing ext_proc server on the EPP's gRPC stack
  (`bench.null_extproc`, `--no-ceiling` to skip): the ceiling of any Python ext_proc path
  here, which the EPP's own per-request work is measured against;
* peers: the same rps / ratio / added p50 for each peer router (`--peers`, default
  vllm-router and sglang-router cache_aware, from the `peers` extra; skipped with the reason
  when a binary is missing) in front of the same backends, and `epp_rps_over_this`: the
  EPP path's rps over that router's, round by round (median, 95% interval; above 1 = the
  EPP path is faster).

`--workers N` runs the EPP as `epp serve --workers N` (one port, SO_REUSEPORT; Envoy caps
streams per HTTP/2 connection so it opens several connections for the kernel to spread);
`--epp-processes N` runs N replicas on their own ports (sharing state unless `--no-sync`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from bench import terminable
from bench.machine import python_loop_ms
from bench.report import bootstrap_ci
from bench.routers import RouterSpec, RouterUnavailable, launch
from epp.datalayer.eds_file import write_eds
from epp.devstack.envoy import (
    BODY_MODES,
    EnvoyOptions,
    render_envoy_config,
    render_round_robin_config,
    start_envoy,
)
from epp.devstack.procs import free_port, stop_process, wait_http
from epp.devstack.stack import free_port_block, start_gateway

BACKEND_IPS = ["127.0.4.2", "127.0.4.3", "127.0.4.4", "127.0.4.5"]
COMPLETION = orjson.dumps(
    {
        "id": "cmpl-bench",
        "object": "text_completion",
        "model": "bench",
        "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
    }
).decode()

WRK_SCRIPT = """
local f = io.open(os.getenv("WRK_BODY_FILE"), "rb")
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
"""


def backend_config(port: int, admin_port: int) -> dict[str, Any]:
    listeners = []
    for i, ip in enumerate(BACKEND_IPS):
        hcm = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": f"backend{i}",
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "direct_response": {
                                    "status": 200,
                                    "body": {"inline_string": COMPLETION},
                                },
                                "response_headers_to_add": [
                                    {
                                        "header": {
                                            "key": "content-type",
                                            "value": "application/json",
                                        }
                                    },
                                    {"header": {"key": "x-served-by", "value": f"{ip}:{port}"}},
                                ],
                            }
                        ],
                    }
                ]
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                    },
                }
            ],
        }
        listeners.append(
            {
                "name": f"backend{i}",
                "address": {"socket_address": {"address": ip, "port_value": port}},
                "per_connection_buffer_limit_bytes": 32 << 20,
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.http_connection_manager",
                                "typed_config": hcm,
                            }
                        ]
                    }
                ],
            }
        )
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {"listeners": listeners},
    }


def wrk(
    url: str, body_file: Path, script: Path, connections: int, duration: float
) -> dict[str, float]:
    env = {**os.environ, "WRK_BODY_FILE": str(body_file)}
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=duration + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _latency_ms(re.search(r"50%\s+([\d.]+)(us|ms|s)", out))  # type: ignore[arg-type]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": p50, "non2xx": float(errors.group(1)) if errors else 0.0}


def _latency_ms(m: re.Match[str]) -> float:
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000.0 if unit == "us" else value * 1000.0 if unit == "s" else value


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: `apt-get install wrk` (make bench does it)")
    work = Path(tempfile.mkdtemp(prefix="epp-proxy-bench-"))
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT)
    small = work / "small.json"
    small.write_text(
        orjson.dumps({"model": "bench", "prompt": "Say hi.", "max_tokens": 8}).decode()
    )
    large = work / "large.json"
    large.write_text(orjson.dumps({"model": "bench", "prompt": "lorem ipsum " * 18_500}).decode())
    port = free_port()
    try:
        async with contextlib.AsyncExitStack() as stack:
            backend = start_envoy(
                backend_config(port, free_port()), work / "backend", concurrency=1
            )
            stack.callback(stop_process, backend)
            for ip in BACKEND_IPS:
                await wait_http(f"http://{ip}:{port}/health", proc=backend)
            rr_port = free_port()
            rr = start_envoy(
                render_round_robin_config(rr_port, free_port(), [(ip, port) for ip in BACKEND_IPS]),
                work / "rr",
                concurrency=1,
            )
            stack.callback(stop_process, rr)
            await wait_http(f"http://127.0.0.1:{rr_port}/health", proc=rr)
            endpoints = [{"address": ip, "port": port} for ip in BACKEND_IPS]
            gw = await start_gateway(
                endpoints,
                epp_processes=args.epp_processes,
                epp_workers=args.workers,
                sync=args.sync,
                scrape_interval=0,  # the backends have no /metrics; EPP-local load signals only
                response_headers=args.response_headers,
                body_mode=args.body_mode,
                access_log=args.access_log,
                workdir=str(work / "gw"),
            )
            stack.callback(gw.close)
            # Every setup runs for the whole measurement, so that its rounds interleave.
            targets = {
                PLAIN: f"http://127.0.0.1:{rr_port}/v1/completions",
                EPP: f"{gw.url}/v1/completions",
            }
            if args.compare_access_log:
                gw_al = await start_gateway(
                    endpoints,
                    scrape_interval=0,
                    body_mode=args.body_mode,
                    access_log=True,
                    workdir=str(work / "gw-access-log"),
                )
                stack.callback(gw_al.close)
                targets[EPP_ACCESS_LOG] = f"{gw_al.url}/v1/completions"
            if args.ceiling:
                targets[NULL] = await stack.enter_async_context(
                    null_gateway(
                        port,
                        work / "null",
                        response_headers=args.response_headers and not args.access_log,
                        body_mode=args.body_mode,
                    )
                )
            skipped = await _start_peers(args, stack, port, work, targets)
            return _measure_all(args, targets, skipped, small, large, script)
    finally:
        shutil.rmtree(work, ignore_errors=True)


PLAIN, EPP, NULL = "plain", "epp", "null_extproc"
EPP_ACCESS_LOG = "epp --response-from-access-log"


def _measure_all(
    args: argparse.Namespace,
    targets: dict[str, str],
    skipped: dict[str, Any],
    small: Path,
    large: Path,
    script: Path,
) -> dict[str, Any]:
    """`--rounds` rounds of every setup, interleaved (each round starts one setup later), so
    that a slow spell of the machine lands on all of them; medians and 95% intervals."""
    d, c, rounds = args.duration, args.connections, args.rounds
    for url in targets.values():
        wrk(url, small, script, 4, 1)  # warm-up
    names = list(targets)
    non2xx = dict.fromkeys(names, 0.0)

    def rounds_of(key: str, connections: int, duration: float) -> dict[str, list[float]]:
        got: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                out = wrk(targets[n], small, script, connections, duration)
                got[n].append(out[key])
                non2xx[n] += out["non2xx"]
        return got

    rps = rounds_of("rps", c, d)
    p50 = rounds_of("p50_ms", 1, d / 2)
    plain_large = wrk(targets[PLAIN], large, script, 1, d / 2)
    epp_large = wrk(targets[EPP], large, script, 1, d / 2)

    def setup(n: str) -> dict[str, Any]:
        """One setup against plain Envoy (and the EPP against it), round by round."""
        out: dict[str, Any] = {
            "rps": _med(rps[n]),
            "rps_ci95": _ci(rps[n]),
            "ratio": _med([a / b for a, b in zip(rps[n], rps[PLAIN], strict=True)], 3),
            "p50_ms_c1": _med(p50[n], 3),
            "added_p50_ms_c1": _med([a - b for a, b in zip(p50[n], p50[PLAIN], strict=True)], 3),
            "non2xx": non2xx[n],
            "rps_rounds": rps[n],
        }
        if n != EPP:
            # > 1: the EPP path is faster; the interval says whether that is beyond the noise
            per_round = [a / b for a, b in zip(rps[EPP], rps[n], strict=True)]
            out["epp_rps_over_this"] = _med(per_round, 3)
            out["epp_rps_over_this_ci95"] = _ci(per_round, 3)
        return out

    epp = setup(EPP)
    return {
        "machine_loop_ms": python_loop_ms(),
        "plain_envoy_rps": _med(rps[PLAIN]),
        "epp_rps": epp["rps"],
        "epp_rps_ci95": epp["rps_ci95"],
        "ratio": epp["ratio"],
        "added_p50_ms_c1": epp["added_p50_ms_c1"],
        "large_body_added_ms": round(epp_large["p50_ms"] - plain_large["p50_ms"], 3),
        "plain_p50_ms_c1": _med(p50[PLAIN], 3),
        "epp_p50_ms_c1": epp["p50_ms_c1"],
        "rounds": rounds,
        "connections": c,
        "epp_processes": args.epp_processes,
        "epp_workers": args.workers,
        "sync": args.sync,
        "response_headers": args.response_headers,
        "body_mode": args.body_mode,
        "access_log": args.access_log,
        "non2xx": non2xx[PLAIN] + non2xx[EPP] + plain_large["non2xx"] + epp_large["non2xx"],
        "plain_rps_rounds": rps[PLAIN],
        "epp_rps_rounds": rps[EPP],
        "null_extproc": setup(NULL) if NULL in targets else None,
        "peers": {
            **{n: setup(n) for n in names if n not in (PLAIN, EPP, NULL)},
            **skipped,
        },
    }


def _med(values: list[float], digits: int = 1) -> float:
    return round(statistics.median(values), digits)


def _ci(values: list[float], digits: int = 1) -> list[float] | None:
    """95% bootstrap interval of the median; None with fewer than 3 rounds."""
    if len(values) < 3:
        return None
    lo, hi = bootstrap_ci(values, 50)
    return [round(lo, digits), round(hi, digits)]


@contextlib.asynccontextmanager
async def null_gateway(
    backend_port: int,
    work: Path,
    *,
    response_headers: bool = True,
    body_mode: str = "FULL_DUPLEX_STREAMED",
) -> AsyncIterator[str]:
    """Envoy (the EPP path's gateway config) in front of `bench.null_extproc`, routing to
    the backends on BACKEND_IPS:`backend_port`; yields the completions URL."""
    grpc_port, listen_port, admin_port = free_port(), free_port(), free_port()
    eds = work / "eds" / "pool.yaml"
    eds.parent.mkdir(parents=True)
    write_eds(eds, "pool", [(ip, backend_port) for ip in BACKEND_IPS])
    endpoints = ",".join(f"{ip}:{backend_port}" for ip in BACKEND_IPS)
    with open(work / "server.log", "wb") as log:
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
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stop_process signals the process group
        )
        envoy = None
        try:
            await _wait_listening(grpc_port, server)
            opts = EnvoyOptions(
                listen_port=listen_port,
                admin_port=admin_port,
                epp_ports=[grpc_port],
                response_headers=response_headers,
                body_mode=body_mode,
                eds_path=str(eds),
            )
            envoy = start_envoy(render_envoy_config(opts), work, concurrency=1)
            await wait_http(f"http://127.0.0.1:{admin_port}/ready", proc=envoy)
            yield f"http://127.0.0.1:{listen_port}/v1/completions"
        finally:
            stop_process(envoy)
            stop_process(server)


async def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"bench.null_extproc exited with {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return


async def _start_peers(
    args: argparse.Namespace,
    stack: contextlib.AsyncExitStack,
    port: int,
    work: Path,
    targets: dict[str, str],
) -> dict[str, Any]:
    """Start each peer router (`--peers`) in front of the same backends and add it to
    `targets`; returns the peers that could not start, with the reason."""
    from epp.sim.config import SimConfig

    pool = [SimConfig(host=ip, port=port, model="bench") for ip in BACKEND_IPS]
    skipped: dict[str, Any] = {}
    for name in [n for n in args.peers.split(",") if n]:
        spec = RouterSpec.parse(name)
        try:
            # the peers' Prometheus listens on port + 1 (bench.routers)
            workdir = work / "peers" / name.replace(":", "_")
            url = await stack.enter_async_context(launch(spec, pool, free_port_block(2), workdir))
            targets[name] = f"{url}/v1/completions"
        except RouterUnavailable as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            skipped[name] = {"skipped": " / ".join(lines[:1] + lines[-2:])[:400]}
    return skipped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="interleaved rounds of every setup (median and 95%% interval; default 5)",
    )
    p.add_argument("--epp-processes", type=int, default=1, help="EPP replicas (default: 1)")
    p.add_argument(
        "--workers", type=int, default=1, help="epp serve --workers per replica (default: 1)"
    )
    p.add_argument(
        "--sync",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replicas / workers share state (default: on)",
    )
    p.add_argument(
        "--peers",
        default="vllm-router:cache_aware,sglang-router:cache_aware",
        help="peer routers measured in the same run, comma list, '' for none "
        "(default: vllm-router:cache_aware,sglang-router:cache_aware)",
    )
    p.add_argument(
        "--ceiling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure Envoy + a do-nothing ext_proc server (bench.null_extproc)",
    )
    p.add_argument(
        "--response-headers",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also send response headers to the EPP (status, TTFT metrics)",
    )
    p.add_argument(
        "--body-mode",
        choices=BODY_MODES,
        default="FULL_DUPLEX_STREAMED",
        help="the gateway's ext_proc request body mode (default: FULL_DUPLEX_STREAMED)",
    )
    p.add_argument(
        "--access-log",
        action="store_true",
        help="the EPP learns the response from Envoy's gRPC access log, not response "
        "headers (epp serve --response-from-access-log); the null server gets neither",
    )
    p.add_argument(
        "--compare-access-log",
        action="store_true",
        help="also measure a second EPP path that learns the response from the access log "
        f"(reported with the peers as {EPP_ACCESS_LOG!r})",
    )
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    res = terminable.run(run(a))
    if a.json:
        sys.stdout.write(orjson.dumps(res).decode() + "\n")
    else:
        for k, v in res.items():
            sys.stdout.write(f"{k:>22}: {v}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
