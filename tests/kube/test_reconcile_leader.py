"""The reconciler as a service against the real API server: Lease-based leader election
(one leader, a standby that takes over on release or when the leader stops renewing) and
`epp reconcile --leader-elect --health-port`: two processes, one reconciling, health
endpoints telling which, and a clean hand-over when the leader is stopped."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from epp.devstack.procs import free_port, stop_process
from epp.reconcile.kube import Kube, path_for
from epp.reconcile.leader import LEASE_API, LeaderElector, LeaseSettings
from epp.reconcile.reconciler import pool_path
from hack.kube.cluster import REPO, Cluster
from tests.kube.helpers import ensure_httproute_crd, until_async
from tests.kube.test_reconcile_kube import pool_doc


@pytest.fixture
async def kube(kube_cluster: Cluster) -> AsyncIterator[Kube]:
    k = await Kube.connect(str(kube_cluster.kubeconfig))
    yield k
    await k.close()


def settings(ns: str, who: str) -> LeaseSettings:
    return LeaseSettings(namespace=ns, name="lease", identity=who, lease_duration=2.0,
                         renew_deadline=1.5, retry_period=0.2)


async def test_one_leader_release_and_expiry_hand_over(kube: Kube, kube_ns: str) -> None:
    a = LeaderElector(kube, settings(kube_ns, "a"))
    b = LeaderElector(kube, settings(kube_ns, "b"))
    await asyncio.wait_for(a.acquire(), 5)
    b_wins = asyncio.create_task(b.acquire())
    await asyncio.sleep(1.0)  # a renews nothing yet, but its lease is fresh: b waits
    assert not b_wins.done() and b.holder == "a"
    a_holds = asyncio.create_task(a.hold())
    await asyncio.sleep(2.5)  # longer than the lease: a keeps renewing it
    assert not b_wins.done() and a.is_leader
    a_holds.cancel()
    await a.release()  # clean stop: b takes over within a retry period or two
    t0 = time.monotonic()
    await asyncio.wait_for(b_wins, 3)
    assert time.monotonic() - t0 < 1.0
    lease = await kube.get(path_for(LEASE_API, "leases", kube_ns, "lease"))
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] >= 1

    # b stops renewing without releasing (a crash): a waits out the lease duration.
    t0 = time.monotonic()
    await asyncio.wait_for(a.acquire(), 6)
    waited = time.monotonic() - t0
    assert 1.5 <= waited < 4.0, waited
    # b finds out it lost the lease on its next renewal attempt.
    assert not await b.try_acquire_or_renew() and b.holder == "a"


async def _readyz(port: int) -> str:
    try:
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{port}/readyz", timeout=aiohttp.ClientTimeout(total=1)) as r:
            return f"{r.status} {(await r.text()).strip()}"
    except (aiohttp.ClientError, TimeoutError):
        return "down"


async def test_two_reconciler_processes_one_active_then_hand_over(
        kube_cluster: Cluster, kube: Kube, kube_ns: str, tmp_path: Path) -> None:
    ensure_httproute_crd(kube_cluster)
    ports = [free_port(), free_port()]
    env = {**os.environ, "PYTHONPATH": str(REPO), "POD_NAMESPACE": kube_ns}
    procs: list[subprocess.Popen[bytes]] = []
    for i, port in enumerate(ports):
        log = (tmp_path / f"reconciler-{i}.log").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "epp.cli", "reconcile", "--kubeconfig",
             str(kube_cluster.kubeconfig), "-n", kube_ns, "--leader-elect",
             "--health-port", str(port), "--lease-duration", "3", "--renew-deadline", "2",
             "--retry-period", "0.3", "--resync", "2"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True))
    try:
        async def roles() -> dict[str, int] | None:
            states = [await _readyz(p) for p in ports]
            found = {s: i for i, s in enumerate(states)}
            if "200 leader" in found and "200 standby" in found:
                return {"leader": found["200 leader"], "standby": found["200 standby"]}
            return None

        r = await until_async(roles, 20, "one leader and one standby, both ready")
        await kube.create(pool_path(kube_ns), pool_doc(kube_ns, "one"))

        async def reconciled(name: str) -> bool:
            raw = await kube.get(pool_path(kube_ns, name))
            return bool((raw.get("status") or {}).get("observedGeneration"))

        await until_async(lambda: reconciled("one"), 20, "the leader reconciles a pool")
        t_stop = time.monotonic()
        stop_process(procs[r["leader"]])  # SIGTERM: the leader releases its Lease
        assert procs[r["leader"]].returncode == 0

        async def took_over() -> bool:
            return await _readyz(ports[r["standby"]]) == "200 leader"

        await until_async(took_over, 10, "the standby takes over")
        assert time.monotonic() - t_stop < 5  # released, not waited out
        await kube.create(pool_path(kube_ns), pool_doc(kube_ns, "two"))
        await until_async(lambda: reconciled("two"), 20, "the new leader reconciles")
    except BaseException:
        for f in sorted(tmp_path.glob("*.log")):
            sys.stderr.write(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}\n")
        raise
    finally:
        for p in procs:
            stop_process(p)


def test_health_port_in_use_is_a_user_error(kube_cluster: Cluster) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        res = subprocess.run(
            [sys.executable, "-m", "epp.cli", "reconcile", "--kubeconfig",
             str(kube_cluster.kubeconfig), "--health-port", str(s.getsockname()[1])],
            capture_output=True, text=True, timeout=60, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 2 and "--health-port: cannot listen" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


