"""Fault scenarios through the real gateway: a pod SIGKILLed under load.

    python -m bench.faults [--rate 20] [--duration 30] [--pods 3] [--json]

Three (`--pods`) simulator processes, one per pod, behind Envoy + the EPP (`start_gateway`,
override_host retries on the EPP's fallbacks). An open-loop client sends `--rate` req/s
(half streamed, half not); at `--kill-at` seconds pod 0 is SIGKILLed, at `--restart-at` it
comes back on the same address. Every request is classified by when its first response
byte arrived relative to the kill:

* `failed_without_byte`: failed although no response byte had reached the client before
  the pod died: the gateway should have retried it on a fallback (goal: 0);
* `cut_mid_response`: streams that had started before the kill and were cut by it (the
  gateway never replays a response once bytes have gone out);
* `retried`: requests whose response says `x-envoy-attempt-count` > 1; checked against
  Envoy's own retry counter (`hidden_retries` = retries no answered request accounts for);
* `last_pick_after_kill_s`: how long the EPP kept picking the dead pod; `back_after_restart_s`:
  how long after the restart it got traffic again.

The integration test tests/integration/test_pod_kill.py runs the same code, smaller.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import terminable
from epp.devstack.procs import free_port, stop_process, wait_http
from epp.devstack.stack import GatewayHandle, start_gateway

MODEL = "sim-model"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SimPod:
    """One simulator process = one pod, so it can be killed alone."""

    ip: str
    port: int
    logdir: Path
    time_scale: float = 1.0
    kv_events_port: int = 0
    extra: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def key(self) -> str:
        return f"{self.ip}:{self.port}"

    def endpoint(self, name: str) -> dict[str, Any]:
        return {"address": self.ip, "port": self.port, "name": name}

    async def start(self) -> None:
        self.starts += 1
        args = [
            sys.executable, "-m", "epp.sim", "--servers", "1", "--base-ip", self.ip,
            "--port", str(self.port), "--model", MODEL, "--time-scale", str(self.time_scale),
        ]  # fmt: skip
        if self.kv_events_port:
            args += ["--kv-events-port", str(self.kv_events_port)]
        args += list(self.extra)
        log = (self.logdir / f"sim-{self.ip}-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        await wait_http(f"http://{self.key}/health", proc=self.proc)

    def kill(self) -> None:
        """SIGKILL: no goodbye, open connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        stop_process(self.proc)


async def start_pods(
    n: int, logdir: Path, *, base: str = "127.0.7.", time_scale: float = 1.0, **kw: Any
) -> list[SimPod]:
    pods = []
    for i in range(n):
        ip = f"{base}{10 + i}"
        pods.append(SimPod(ip, free_port(ip), logdir, time_scale, **kw))
    try:
        await asyncio.gather(*(p.start() for p in pods))
    except BaseException:
        for p in pods:
            p.stop()
        raise
    return pods


@dataclass
class Outcome:
    sent_at: float
    stream: bool
    status: int = 0
    first_byte_at: float | None = None
    ended_at: float = 0.0
    ok: bool = False
    attempts: int = 0
    error: str = ""
    cancelled: bool = False


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    rng: random.Random,
    t0: float,
    *,
    cancel_after: float | None = None,
    max_tokens: tuple[int, int] = (32, 256),
) -> Outcome:
    """POST one completion; a stream is ok only if it ends with [DONE]."""
    stream = rng.random() < 0.5
    body = {
        "model": MODEL,
        "prompt": f"request {rng.random()} " + "tell me about the sea " * rng.randint(4, 40),
        "max_tokens": rng.randint(*max_tokens),
        "stream": stream,
    }
    out = Outcome(sent_at=time.monotonic() - t0, stream=stream)

    async def go() -> None:
        async with session.post(url + "/v1/completions", data=orjson.dumps(body)) as r:
            out.first_byte_at = time.monotonic() - t0
            out.status = r.status
            out.attempts = int(r.headers.get("x-envoy-attempt-count", "0") or 0)
            raw = await r.read()
            if r.status != 200:
                out.error = raw[:200].decode(errors="replace")
            elif stream:
                out.ok = raw.rstrip().endswith(b"data: [DONE]") and raw.count(b'"id":"cmpl-') > 0
                ids = {line[10:50] for line in raw.split(b"\n\n") if line.startswith(b"data: {")}
                if len(ids) > 1:  # two responses spliced into one: a replay after bytes
                    out.ok = False
                    out.error = "spliced stream"
                elif not out.ok:
                    out.error = "incomplete stream"
            else:
                out.ok = b'"choices"' in raw

    try:
        if cancel_after is None:
            await go()
        else:
            try:
                await asyncio.wait_for(go(), cancel_after)
            except TimeoutError:
                out.cancelled = True
    except (aiohttp.ClientError, ConnectionError) as e:
        out.error = f"{type(e).__name__}: {e}"
    out.ended_at = time.monotonic() - t0
    return out


async def envoy_counter(gw: GatewayHandle, name: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"{gw.admin_url}/stats?filter={name}$") as r:
        text = await r.text()
    for line in text.splitlines():
        k, _, v = line.partition(": ")
        if k == name:
            return int(v)
    return 0


async def epp_samples(gw: GatewayHandle, name: str) -> list[tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for fam in text_string_to_metric_families(await gw.metrics_text()):
        for s in fam.samples:
            if s.name == name:
                out.append((dict(s.labels), float(s.value)))
    return out


async def picks_of(gw: GatewayHandle, key: str) -> float:
    samples = await epp_samples(gw, "epp_endpoint_picks_total")
    return sum(v for labels, v in samples if labels.get("endpoint") == key)


async def is_down(gw: GatewayHandle, key: str) -> bool:
    samples = await epp_samples(gw, "epp_endpoint_down")
    return any(labels.get("endpoint") == key and v > 0 for labels, v in samples)


@dataclass
class KillReport:
    rate: float
    duration_s: float
    pods: int
    requests: int = 0
    ok: int = 0
    failed: int = 0
    failed_without_byte: int = 0
    cut_mid_response: int = 0
    in_flight_on_kill: int = 0
    retried: int = 0
    envoy_retries: int = 0
    hidden_retries: int = 0
    marked_down_after_kill_s: float | None = None
    last_pick_after_kill_s: float | None = None
    back_after_restart_s: float | None = None
    inflight_after: float = -1.0
    open_requests_after: float = -1.0
    failures: list[str] = field(default_factory=list)


async def run_kill(
    *,
    rate: float = 20.0,
    duration: float = 12.0,
    n_pods: int = 3,
    kill_at: float = 4.0,
    restart_at: float | None = 8.0,
    time_scale: float = 1.0,
    workdir: Path,
    seed: int = 1,
) -> KillReport:
    workdir.mkdir(parents=True, exist_ok=True)
    pods = await start_pods(n_pods, workdir, time_scale=time_scale)
    rep = KillReport(rate=rate, duration_s=duration, pods=n_pods)
    gw: GatewayHandle | None = None
    try:
        gw = await start_gateway(
            [p.endpoint(f"pod-{i}") for i, p in enumerate(pods)], workdir=str(workdir / "gw")
        )
        victim = pods[0]
        rng = random.Random(seed)
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as session:
            t0 = time.monotonic()
            tasks: list[asyncio.Task[Outcome]] = []
            killed_at: float | None = None
            restarted_at: float | None = None
            last_pick: float | None = None
            marked_down: float | None = None
            back: float | None = None
            picks = 0.0
            n = 0
            while (now := time.monotonic() - t0) < duration:
                if n < now * rate:
                    tasks.append(asyncio.create_task(one_request(session, gw.url, rng, t0)))
                    n += 1
                    continue
                if killed_at is None and now >= kill_at:
                    picks = await picks_of(gw, victim.key)
                    victim.kill()
                    killed_at = time.monotonic() - t0
                elif killed_at is not None and restarted_at is None:
                    p = await picks_of(gw, victim.key)
                    if p > picks:
                        picks, last_pick = p, time.monotonic() - t0
                    if marked_down is None and await is_down(gw, victim.key):
                        marked_down = time.monotonic() - t0
                    if restart_at is not None and now >= restart_at:
                        await victim.start()
                        restarted_at = time.monotonic() - t0
                elif (
                    restarted_at is not None
                    and back is None
                    and await picks_of(gw, victim.key) > picks
                ):
                    back = time.monotonic() - t0 - restarted_at
                await asyncio.sleep(min(0.02, max(0.0, (n + 1) / rate - now)))
            outcomes = await asyncio.gather(*tasks)
        assert killed_at is not None
        rep.requests = len(outcomes)
        for o in outcomes:
            if o.ok:
                rep.ok += 1
            else:
                rep.failed += 1
                byte_before_kill = o.first_byte_at is not None and o.first_byte_at <= killed_at
                if byte_before_kill and o.stream and o.status == 200:
                    rep.cut_mid_response += 1
                else:
                    rep.failed_without_byte += 1
                    rep.failures.append(
                        f"sent {o.sent_at:.2f}s status {o.status} stream {o.stream}: {o.error}"
                    )
            if o.sent_at <= killed_at and (o.first_byte_at is None or o.first_byte_at > killed_at):
                rep.in_flight_on_kill += 1
            if o.attempts > 1:
                rep.retried += 1
        rep.envoy_retries = await envoy_counter(gw, "cluster.pool.upstream_rq_retry")
        rep.hidden_retries = rep.envoy_retries - sum(max(0, o.attempts - 1) for o in outcomes)
        rep.last_pick_after_kill_s = None if last_pick is None else last_pick - killed_at
        rep.marked_down_after_kill_s = None if marked_down is None else marked_down - killed_at
        rep.back_after_restart_s = back
        for _ in range(100):
            inflight = await epp_samples(gw, "epp_inflight_requests")
            rep.inflight_after = sum(v for _, v in inflight)
            rep.open_requests_after = sum(v for _, v in await epp_samples(gw, "epp_open_requests"))
            if rep.inflight_after == 0 and rep.open_requests_after == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        if gw is not None:
            gw.close()
        for pod in pods:
            pod.stop()
    return rep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=20.0, help="requests per second (20)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (30)")
    p.add_argument("--pods", type=int, default=3, help="simulator pods (3)")
    p.add_argument("--kill-at", type=float, default=8.0, help="SIGKILL pod 0 at (8 s)")
    p.add_argument("--restart-at", type=float, default=18.0, help="restart it at (18 s)")
    p.add_argument("--time-scale", type=float, default=1.0, help="simulator time scale (1)")
    p.add_argument("--workdir", default=None, help="logs folder (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="epp-faults-") as tmp:
        rep = terminable.run(
            run_kill(
                rate=a.rate,
                duration=a.duration,
                n_pods=a.pods,
                kill_at=a.kill_at,
                restart_at=a.restart_at,
                time_scale=a.time_scale,
                workdir=Path(a.workdir or tmp),
            )
        )
    if a.json:
        print(orjson.dumps(asdict(rep), option=orjson.OPT_INDENT_2).decode())
    else:
        for k, v in asdict(rep).items():
            print(f"{k:24} {v}")
    return 0 if rep.failed_without_byte == 0 and rep.hidden_retries == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
