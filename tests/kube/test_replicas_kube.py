"""Two EPP replicas find each other through their own Service's EndpointSlices (read-only RBAC,
the ServiceAccount's token only) and share state; a replica whose pod goes away leaves the
other's peer list.

The replicas run as processes bound to the loopback IPs the fake kubelet gave their pods,
with POD_NAME / POD_IP set the way the Deployment's downward API sets them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from epp.devstack.procs import free_port, stop_process, wait_http
from hack.kube.cluster import REPO, Cluster
from tests.kube.helpers import kubectl, pod_yaml, pool_yaml, until
from tests.kube.test_rbac import _sa_kubeconfig

pytestmark = pytest.mark.filterwarnings("ignore:Unverified HTTPS request")


def _service(ns: str, sync_port: int) -> str:
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: epp, namespace: {ns}}}
spec:
  selector: {{app: epp}}
  ports:
  - {{name: grpc-ext-proc, port: 9002, targetPort: 9002}}
  - {{name: sync, port: {sync_port}, targetPort: {sync_port}}}
"""


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        stop_process(p)


async def _debug(port: int, ip: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://{ip}:{port}/debug/sync") as r:
        data: dict[str, Any] = await r.json()
        return data


async def test_two_replicas_discover_each_other(
    managed_cluster: Cluster, kube_ns: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    ns = kube_ns
    await kubectl(managed_cluster, "apply", "-n", ns, "-f", str(REPO / "manifests" / "rbac"))
    sync_port = free_port()
    docs = [
        pool_yaml("pool", ns, {"app": "sim"}, [8000]),
        pod_yaml("sim-0", ns, {"app": "sim"}),
        pod_yaml("epp-0", ns, {"app": "epp"}),
        pod_yaml("epp-1", ns, {"app": "epp"}),
        _service(ns, sync_port),
    ]
    await kubectl(managed_cluster, "apply", "-f", "-", input="---".join(docs))

    def pod_ips() -> dict[str, str] | None:
        items = json.loads(
            managed_cluster.kubectl("get", "pods", "-n", ns, "-l", "app=epp", "-o", "json")
        )["items"]
        found = {p["metadata"]["name"]: p["status"].get("podIP") for p in items}
        return found if len(found) == 2 and all(found.values()) else None

    ips = await until(pod_ips, timeout=20, interval=0.2, what="EPP pod IPs")
    sa_kubeconfig = await _sa_kubeconfig(managed_cluster, ns, tmp_path / "kubeconfig")
    metrics = {}
    for name, ip in sorted(ips.items()):
        metrics[name] = free_port(ip)
        env = {**os.environ, "POD_NAME": name, "POD_IP": ip, "POD_NAMESPACE": ns}
        cmd = [sys.executable, "-m", "epp.cli", "serve", "--bind-address", ip,
               "--grpc-port", str(free_port(ip)), "--grpc-health-port", str(free_port(ip)),
               "--metrics-port", str(metrics[name]), "--kubeconfig", str(sa_kubeconfig),
               "--pool-name", "pool", "--pool-namespace", ns, "--scrape-interval", "0",
               "--sync-service", "epp", "--sync-port", str(sync_port),
               "--sync-peer-timeout", "1.0", "--sync-snapshot-interval", "0.2"]  # fmt: skip
        log = (tmp_path / f"{name}.log").open("wb")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))  # fmt: skip
    for (name, ip), proc in zip(sorted(ips.items()), procs, strict=True):
        await wait_http(f"http://{ip}:{metrics[name]}/readyz", proc=proc, timeout=30)

    def peers_of(name: str) -> set[str]:
        return {o.split("/")[0] for o in states[name]["peers"]}

    states: dict[str, dict[str, Any]] = {}

    async def both_see_each_other() -> bool:
        for name, ip in ips.items():
            states[name] = await _debug(metrics[name], ip)
        return peers_of("epp-0") == {"epp-1"} and peers_of("epp-1") == {"epp-0"}

    for _ in range(100):
        if await both_see_each_other():
            break
        await asyncio.sleep(0.1)
    else:
        logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
        raise AssertionError(f"replicas did not find each other: {states} {logs}")
    # Each dials only the other pod's IP (its own address is excluded: POD_IP).
    for name in ips:
        other = next(i for n, i in ips.items() if n != name)
        assert set(states[name]["links"]) == {f"{other}:{sync_port}"}
        assert states[name]["links"][f"{other}:{sync_port}"]["connected"]

    # epp-1's pod is deleted and its process stops: epp-0 drops the link and the peer.
    await kubectl(managed_cluster, "delete", "pod", "epp-1", "-n", ns, "--wait=false")
    stop_process(procs[1])

    async def gone() -> bool:
        st = await _debug(metrics["epp-0"], ips["epp-0"])
        return not st["links"] and not st["peers"]

    for _ in range(100):
        if await gone():
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(await _debug(metrics["epp-0"], ips["epp-0"]))
