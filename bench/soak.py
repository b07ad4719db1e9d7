"""Soak: a long run through Envoy + the EPP with everything that goes wrong in a pool.

    python -m bench.soak [--duration 1800] [--rate 10] [--pods 4] [--json]   (make soak)

Simulator pods, one process each, publishing KV events (the EPP subscribes with
`--kv-events-port`), behind `start_gateway`. An open-loop client sends `--rate` req/s (half
streamed, `--cancel-share` of them cancelled by the client after a random delay). Meanwhile:

* every `--kill-every` s one pod is SIGKILLed and restarted `--down-for` s later;
* every `--churn-every` s one pod leaves the endpoints file, is restarted once drained (its
  KV-event publisher restarts with it) and comes back into the file;
* the EPP's own metrics are sampled every few seconds: RSS, open fds, asyncio tasks,
  in-flight and open requests.

It asserts at the end (exit 1 otherwise, with the reasons):
* in-flight gauges and open requests back to 0 once the load stops;
* RSS growth < 10% between the end of warm-up and the end of the run;
* open fds and asyncio tasks flat: after the load, no more than in the minute after warm-up
  (+ a small slack);
* no failed request other than streams in flight on a pod when it was killed.

tests/integration/test_soak.py runs a 3-minute version; the 30-minute figures are in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import terminable
from bench.faults import Outcome, SimPod, envoy_counter, epp_samples, one_request
from epp.devstack.procs import free_port
from epp.devstack.stack import GatewayHandle, start_gateway

FD_SLACK = 8
TASK_SLACK = 8
RSS_GROWTH_LIMIT = 0.10


@dataclass
class Sample:
    t: float
    rss: float
    fds: float
    tasks: float
    inflight: float
    open_requests: float


@dataclass
class SoakReport:
    duration_s: float
    rate: float
    pods: int
    requests: int = 0
    ok: int = 0
    cancelled_by_client: int = 0
    failed: int = 0
    failed_excused: int = 0  # streams cut by a pod kill
    kills: int = 0
    churns: int = 0
    envoy_retries: int = 0
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_growth: float = 0.0
    fds_warm: float = 0.0
    fds_end: float = 0.0
    tasks_warm: float = 0.0
    tasks_end: float = 0.0
    inflight_end: float = -1.0
    open_requests_end: float = -1.0
    failures: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)


async def sample(gw: GatewayHandle, t0: float) -> Sample:
    def one(name: str, samples: list[tuple[dict[str, str], float]]) -> float:
        return sum(v for _, v in samples)

    names = [
        "process_resident_memory_bytes",
        "process_open_fds",
        "epp_asyncio_tasks",
        "epp_inflight_requests",
        "epp_open_requests",
    ]
    vals = [one(n, await epp_samples(gw, n)) for n in names]
    return Sample(time.monotonic() - t0, *vals)


def kv_port_for(ips: list[str]) -> int:
    """A port free on every pod IP (each pod publishes KV events on ip:port)."""
    for _ in range(20):
        port = free_port(ips[0])
        try:
            for ip in ips[1:]:
                import socket

                with socket.socket() as s:
                    s.bind((ip, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port for KV events")


async def run_soak(
    *,
    duration: float,
    rate: float = 10.0,
    n_pods: int = 4,
    kill_every: float = 120.0,
    down_for: float = 10.0,
    churn_every: float = 90.0,
    cancel_share: float = 0.1,
    warmup: float | None = None,
    sample_every: float = 5.0,
    workdir: Path,
    seed: int = 1,
    log: Any = None,
) -> SoakReport:
    say = log or (lambda *_: None)
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    warm = warmup if warmup is not None else min(300.0, duration / 3)
    ips = [f"127.0.9.{10 + i}" for i in range(n_pods)]
    kv_port = kv_port_for(ips)
    pods = [SimPod(ip, free_port(ip), workdir, kv_events_port=kv_port) for ip in ips]
    rep = SoakReport(duration_s=duration, rate=rate, pods=n_pods)
    gw: GatewayHandle | None = None
    try:
        await asyncio.gather(*(p.start() for p in pods))
        names = {p.key: f"pod-{i}" for i, p in enumerate(pods)}
        in_file = set(names)

        def write_file() -> None:
            assert gw is not None
            gw.write_endpoints([p.endpoint(names[p.key]) for p in pods if p.key in in_file])

        gw = await start_gateway(
            [p.endpoint(names[p.key]) for p in pods],
            workdir=str(workdir / "gw"),
            epp_args=["--kv-events-port", str(kv_port)],
        )
        kills: list[float] = []
        samples: list[Sample] = []
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as session:
            t0 = time.monotonic()
            tasks: list[asyncio.Task[Outcome]] = []
            chaos: set[asyncio.Task[None]] = set()
            next_kill, next_churn, next_sample = kill_every, churn_every / 2, 0.0
            n = 0

            async def kill_and_restart(pod: SimPod) -> None:
                pod.kill()
                kills.append(time.monotonic() - t0)
                say(f"{kills[-1]:7.1f}s SIGKILL {pod.key}")
                await asyncio.sleep(down_for)
                await pod.start()
                say(f"{time.monotonic() - t0:7.1f}s restarted {pod.key}")

            async def churn(pod: SimPod) -> None:
                in_file.discard(pod.key)
                write_file()
                say(f"{time.monotonic() - t0:7.1f}s {pod.key} left the endpoints file")
                await asyncio.sleep(min(20.0, churn_every / 3))  # drained by then
                pod.stop()  # graceful: its KV-event publisher goes away too
                await pod.start()
                in_file.add(pod.key)
                write_file()
                say(f"{time.monotonic() - t0:7.1f}s {pod.key} restarted and back in the file")

            busy: set[str] = set()

            def launch(make: Any, pod: SimPod) -> None:
                busy.add(pod.key)
                task = asyncio.create_task(make(pod))
                chaos.add(task)
                task.add_done_callback(functools.partial(_forget, chaos, busy, pod.key))

            while (now := time.monotonic() - t0) < duration:
                if n < now * rate:
                    cancel = rng.uniform(0.05, 1.5) if rng.random() < cancel_share else None
                    tasks.append(
                        asyncio.create_task(
                            one_request(
                                session, gw.url, rng, t0, cancel_after=cancel, max_tokens=(8, 96)
                            )
                        )
                    )
                    n += 1
                    continue
                free = [p for p in pods if p.key not in busy and p.key in in_file]
                if now >= next_kill and len(free) > 1:
                    launch(kill_and_restart, rng.choice(free))
                    rep.kills += 1
                    next_kill += kill_every
                elif now >= next_churn and len(free) > 1:
                    launch(churn, rng.choice(free))
                    rep.churns += 1
                    next_churn += churn_every
                if now >= next_sample:
                    samples.append(await sample(gw, t0))
                    next_sample += sample_every
                await asyncio.sleep(min(0.02, max(0.0, (n + 1) / rate - now)))
            outcomes = await asyncio.gather(*tasks)
            for task in list(chaos):
                with contextlib.suppress(Exception):
                    await task
        in_file = set(names)
        write_file()
        for o in outcomes:
            rep.requests += 1
            if o.cancelled:
                rep.cancelled_by_client += 1
            elif o.ok:
                rep.ok += 1
            else:
                rep.failed += 1
                # A stream that had started when a pod died, and ended after: cut by the kill.
                cut = any(
                    o.stream and o.first_byte_at is not None and o.first_byte_at <= k <= o.ended_at
                    for k in kills
                )
                if cut:
                    rep.failed_excused += 1
                else:
                    rep.failures.append(
                        f"sent {o.sent_at:.2f}s status {o.status} stream {o.stream}: {o.error}"
                    )
        rep.envoy_retries = await envoy_counter(gw, "cluster.pool.upstream_rq_retry")
        end = await sample(gw, t0)
        for _ in range(100):  # let the last releases land
            if end.inflight == 0 and end.open_requests == 0:
                break
            await asyncio.sleep(0.1)
            end = await sample(gw, t0)
        judge(rep, samples, end, warm)
    finally:
        if gw is not None:
            gw.close()
        for p in pods:
            p.stop()
    return rep


def _forget(chaos: set[asyncio.Task[None]], busy: set[str], k: str, t: asyncio.Task[None]) -> None:
    chaos.discard(t)
    busy.discard(k)


def judge(rep: SoakReport, samples: list[Sample], end: Sample, warm: float) -> None:
    after_warm = [s for s in samples if s.t >= warm] or samples[-1:]
    base = after_warm[0]
    # Baselines over the first minute after warm-up. Keep-alive connections come and go with
    # kills and churn, so the bound is that minute's highest count: a leak grows past it.
    window = [s for s in after_warm if s.t <= base.t + 60] or [base]
    rep.rss_warm_mb = base.rss / 2**20
    rep.rss_end_mb = end.rss / 2**20
    rep.rss_growth = end.rss / base.rss - 1 if base.rss else 0.0
    rep.fds_warm = max(s.fds for s in window)
    rep.tasks_warm = max(s.tasks for s in window)
    rep.fds_end, rep.tasks_end = end.fds, end.tasks
    rep.inflight_end, rep.open_requests_end = end.inflight, end.open_requests
    v = rep.violations
    if end.inflight != 0 or end.open_requests != 0:
        v.append(f"in flight after the run: {end.inflight} (open requests {end.open_requests})")
    if rep.rss_growth >= RSS_GROWTH_LIMIT:
        v.append(f"RSS grew {rep.rss_growth:.1%} after warm-up")
    if end.fds > rep.fds_warm + FD_SLACK:
        v.append(f"open fds {rep.fds_warm:.0f} -> {end.fds:.0f}")
    if end.tasks > rep.tasks_warm + TASK_SLACK:
        v.append(f"asyncio tasks {rep.tasks_warm:.0f} -> {end.tasks:.0f}")
    if rep.failures:
        v.append(f"{len(rep.failures)} failed requests not explained by a pod kill")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=1800.0, help="seconds of load (1800)")
    p.add_argument("--rate", type=float, default=10.0, help="requests per second (10)")
    p.add_argument("--pods", type=int, default=4, help="simulator pods (4)")
    p.add_argument("--kill-every", type=float, default=180.0, help="SIGKILL a pod every (180 s)")
    p.add_argument("--down-for", type=float, default=10.0, help="restart it after (10 s)")
    p.add_argument("--churn-every", type=float, default=120.0, help="endpoint churn every (120 s)")
    p.add_argument("--cancel-share", type=float, default=0.1, help="client cancels (0.1)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up (min(300, duration/3))")
    p.add_argument("--workdir", default=None, help="logs folder (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="epp-soak-") as tmp:
        rep = terminable.run(
            run_soak(
                duration=a.duration,
                rate=a.rate,
                n_pods=a.pods,
                kill_every=a.kill_every,
                down_for=a.down_for,
                churn_every=a.churn_every,
                cancel_share=a.cancel_share,
                warmup=a.warmup,
                workdir=Path(a.workdir or tmp),
                log=lambda msg: print(msg, file=sys.stderr, flush=True),
            )
        )
    if a.json:
        print(orjson.dumps(asdict(rep), option=orjson.OPT_INDENT_2).decode())
    else:
        for k, v in asdict(rep).items():
            print(f"{k:22} {v}")
    return 1 if rep.violations else 0


if __name__ == "__main__":
    sys.exit(main())
