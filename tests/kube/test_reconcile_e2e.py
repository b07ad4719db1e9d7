"""End to end: a ModelPool with the simulator engine becomes pods (reconciler in-process, fake
kubelet gives them 127.0.0.x IPs), one simulator process serves every pod IP, `epp serve` in
Kubernetes mode picks behind Envoy, and `epp pool distribute` moves a pod from `testing` to
`production` under steady load: no request fails and, once the EPP has seen the relabel,
each business is served only by the pods now labelled with it.

There is no gateway controller here: the client sends `x-business` itself, as the business's
HTTPRoute would (RequestHeaderModifier set).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from epp.devstack.envoy import EnvoyOptions, render_envoy_config, start_envoy
from epp.devstack.procs import free_port, stop_process, wait_http
from epp.reconcile.assignment import list_pool_pods, pod_info
from epp.reconcile.controller import Controller
from epp.reconcile.kube import Kube
from epp.reconcile.reconciler import pool_path
from hack.kube.cluster import REPO, Cluster
from tests.kube.helpers import until_async

POOL = "e2e"
MODEL = "sim-llama"
BUSINESSES = ("production", "testing")
RATE = 10.0  # requests per second, both businesses alternating
DURATION = 10.0  # seconds of load
DISTRIBUTE_AT = 2.5  # seconds into the load
# How long after `epp pool distribute` returns the EPP may still route by the old labels
# (watch event latency; measured well under 0.5 s here).
SETTLE = 1.5


def pool_doc(ns: str, port: int) -> dict[str, Any]:
    """manifests/samples/modelpool-sim.yaml, in the test namespace, on a free port, starting
    2 production / 2 testing."""
    doc: dict[str, Any] = yaml.safe_load(
        (REPO / "manifests" / "samples" / "modelpool-sim.yaml").read_text())
    doc["metadata"] = {"name": POOL, "namespace": ns}
    doc["spec"]["port"] = port
    doc["spec"]["businesses"][0]["replicas"] = 2
    doc["spec"]["epp"]["serviceName"] = f"{POOL}-epp"
    return doc


@dataclass
class Outcome:
    business: str
    started: float
    status: int = 0
    server: str = ""
    error: str = ""


@dataclass
class Procs:
    """Every process this test starts, stopped by PID (process group) at the end."""

    workdir: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (lives with the process)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
        self.started.append(proc)
        return proc

    def add(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            stop_process(proc)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                         for p in sorted(self.workdir.glob("*.log")))


async def labels_by_ip(kube: Kube, ns: str) -> dict[str, str]:
    """Ready pool pods: pod IP -> business label."""
    out = {}
    for pod in await list_pool_pods(kube, ns, POOL):
        info = pod_info(pod)
        if info.ready:
            out[pod["status"]["podIP"]] = info.business
    return out


async def send(session: aiohttp.ClientSession, url: str, business: str) -> Outcome:
    out = Outcome(business, time.monotonic())
    body = {"model": MODEL, "prompt": f"hello from {business}", "max_tokens": 8}
    try:
        async with session.post(url + "/v1/completions", json=body,
                                headers={"x-business": business},
                                timeout=aiohttp.ClientTimeout(total=10)) as resp:
            text = await resp.text()
            out.status = resp.status
            out.server = resp.headers.get("x-sim-server", "")
            if resp.status != 200:
                out.error = text[:300]
    except (aiohttp.ClientError, TimeoutError) as e:
        out.error = repr(e)
    return out


async def start_stack(procs: Procs, kubeconfig: Path, ns: str, ips: list[str],
                      port: int) -> str:
    """Simulator (one process, every pod IP), EPP in Kubernetes mode, Envoy. Returns the
    gateway URL."""
    sim_cfg = procs.workdir / "sim.yaml"
    sim_cfg.write_text(yaml.safe_dump({"defaults": {"model": MODEL},
                                       "servers": [{"host": ip, "port": port} for ip in ips]}))
    sim = procs.spawn("sim", [sys.executable, "-m", "epp.sim", "--config", str(sim_cfg)])
    grpc_port, metrics_port = free_port(), free_port()
    eds = procs.workdir / "eds" / "pool.yaml"  # the gateway's endpoints, kept by the EPP
    epp = procs.spawn("epp", [
        sys.executable, "-m", "epp.cli", "serve", "--pool-name", POOL, "--pool-namespace", ns,
        "--kubeconfig", str(kubeconfig), "--grpc-port", str(grpc_port),
        "--grpc-health-port", str(free_port()), "--metrics-port", str(metrics_port),
        "--scrape-interval", "0.05", "--envoy-eds-file", str(eds)])
    for ip in ips:
        await wait_http(f"http://{ip}:{port}/health", proc=sim)
    await wait_http(f"http://127.0.0.1:{metrics_port}/readyz", proc=epp)
    opts = EnvoyOptions(listen_port=free_port(), admin_port=free_port(), epp_ports=[grpc_port],
                        eds_path=str(eds))
    envoy = procs.add(start_envoy(render_envoy_config(opts), procs.workdir))
    await wait_http(f"http://127.0.0.1:{opts.admin_port}/ready", proc=envoy)
    return f"http://127.0.0.1:{opts.listen_port}"


async def steady_load(url: str, on_tick: Callable[[float], None]) -> list[Outcome]:
    """RATE req/s for DURATION s (bounded: RATE*DURATION requests), businesses alternating."""
    n = int(RATE * DURATION)
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as session:
        tasks = []
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / RATE - time.monotonic()))
            on_tick(time.monotonic() - t0)
            tasks.append(asyncio.create_task(send(session, url, BUSINESSES[i % 2])))
        return list(await asyncio.gather(*tasks))


async def test_distribute_moves_traffic_between_businesses_without_failures(
        cluster: Cluster, kube: Kube, kube_ns: str, controller: Controller,
        tmp_path: Path) -> None:
    port = free_port()
    await kube.create(pool_path(kube_ns), pool_doc(kube_ns, port))

    async def initial() -> dict[str, str] | None:
        by_ip = await labels_by_ip(kube, kube_ns)
        counts = sorted(by_ip.values())
        return by_ip if counts == ["production"] * 2 + ["testing"] * 2 else None

    before = await until_async(initial, 30, "4 ready pods, 2 production / 2 testing")
    procs = Procs(tmp_path)
    distribute: dict[str, float] = {}
    dist_task: list[asyncio.Task[tuple[int, bytes]]] = []
    try:
        url = await start_stack(procs, cluster.kubeconfig, kube_ns, sorted(before), port)
        async with aiohttp.ClientSession() as session:
            async def warm() -> bool:
                res = await asyncio.gather(*(send(session, url, b) for b in BUSINESSES))
                return all(r.status == 200 for r in res)

            await until_async(warm, 15, "both businesses served through Envoy")

        async def run_distribute() -> tuple[int, bytes]:
            distribute["start"] = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "epp.cli", "pool", "--kubeconfig", str(cluster.kubeconfig),
                "-n", kube_ns, "distribute", POOL, "production=3,testing=1",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, cwd=REPO)
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), 20)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            distribute["done"] = time.monotonic()
            return int(proc.returncode or 0), out

        def on_tick(elapsed: float) -> None:
            if elapsed >= DISTRIBUTE_AT and not dist_task:
                dist_task.append(asyncio.create_task(run_distribute()))

        outcomes = await steady_load(url, on_tick)
        rc, out = await dist_task[0]
        assert rc == 0, out.decode(errors="replace")
        after = await labels_by_ip(kube, kube_ns)

        # The declared distribution holds and exactly one pod moved testing -> production.
        assert sorted(after.values()) == ["production"] * 3 + ["testing"], after
        moved = [ip for ip in after if before.get(ip) != after[ip]]
        assert len(moved) == 1 and before[moved[0]] == "testing", (before, after)

        # Zero failed requests, before, during and after the move.
        failed = [o for o in outcomes if o.status != 200]
        assert not failed, failed[:5]

        def wrong(o: Outcome, labels: dict[str, str]) -> bool:
            return labels.get(o.server.rsplit(":", 1)[0]) != o.business

        early = [o for o in outcomes if o.started < distribute["start"]]
        late = [o for o in outcomes if o.started > distribute["done"] + SETTLE]
        assert len(early) >= 20 and len(late) >= 10, (len(early), len(late))
        assert not [o for o in early if wrong(o, before)], "routed outside its business"
        assert not [o for o in late if wrong(o, after)], [o for o in late if wrong(o, after)]
        lag = max((o.started - distribute["done"] for o in outcomes
                   if o.started > distribute["start"] and wrong(o, after)), default=0.0)
        print(f"distribute took {distribute['done'] - distribute['start']:.2f}s; last request "
              f"routed by the old labels started {lag:.2f}s after it returned")

        # Afterwards: concurrent bursts per business use every pod of that business, the
        # moved pod included, and only those.
        async with aiohttp.ClientSession() as session:
            burst: list[Outcome] = []
            for _ in range(5):
                burst += await asyncio.gather(*(send(session, url, b)
                                                for b in BUSINESSES for _ in range(4)))
        assert all(o.status == 200 for o in burst), [o for o in burst if o.status != 200][:3]
        served = {b: {o.server.rsplit(":", 1)[0] for o in burst if o.business == b}
                  for b in BUSINESSES}
        assert served == {b: {ip for ip, lb in after.items() if lb == b} for b in BUSINESSES}, \
            (served, after)
    except BaseException:
        sys.stderr.write(procs.logs())
        raise
    finally:
        for t in dist_task:
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
        procs.stop_all()
