"""A fake kubelet for the test cluster: no containers, only pod status.

It registers a few Nodes (Ready, roomy allocatable) and then, for every pod the scheduler
binds to one of them:
- sets phase Running, a distinct loopback podIP (127.0.0.10, .11, ... then 127.0.1.10 ...)
  and conditions Ready / ContainersReady / Initialized / PodScheduled;
- honours the annotation `fake-kubelet.epp.dev/ready: "false"` (pod Running, Ready=False),
  and `spec.readinessGates` (Ready only once each gate's condition is True, as a real
  kubelet does: tests that flip gate conditions run on kind/real clusters too);
- finishes deletions: a pod with a deletionTimestamp is deleted with grace period 0
  (what a kubelet does once containers have stopped);
- with `--workdir`, runs the project-image containers of pods in namespaces labelled
  `fake-kubelet.epp.dev/run=true` as local processes, Ready by their readiness probe
  (hack/kube/pod_processes.py says what is faked and how).

Run: python -m hack.kube.fake_kubelet --kubeconfig K [--nodes fake-node-1,fake-node-2]
     [--workdir DIR]
It survives API-server restarts (relists with backoff). Stop it with SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from hack.kube.kubeconfig import KubeAccess, load_kubeconfig
from hack.kube.pod_processes import PodProcesses

log = logging.getLogger("fake-kubelet")

READY_ANNOTATION = "fake-kubelet.epp.dev/ready"
FIRST_HOST = 10  # 127.0.0.10 is the first pod IP
HOSTS_PER_NET = 245  # .10 .. .254
_KUBELET_CONDITIONS = ("Initialized", "PodScheduled", "ContainersReady", "Ready")


def pod_ip(index: int) -> str:
    return f"127.0.{index // HOSTS_PER_NET % 256}.{FIRST_HOST + index % HOSTS_PER_NET}"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_object(name: str) -> dict[str, Any]:
    cap = {"cpu": "256", "memory": "1Ti", "pods": "2000", "ephemeral-storage": "1Ti"}
    now = _now()
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                              "kubernetes.io/os": "linux",
                                              "type": "fake-kubelet"}},
        "spec": {},
        "status": {
            "capacity": cap,
            "allocatable": cap,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": name}],
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "fake kubelet", "lastHeartbeatTime": now,
                 "lastTransitionTime": now},
            ],
            "nodeInfo": {"kubeletVersion": "v1.20.2", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "fake://1",
                         "kernelVersion": "", "osImage": "fake", "kubeProxyVersion": "",
                         "machineID": "", "systemUUID": "", "bootID": ""},
        },
    }


class FakeKubelet:
    def __init__(self, access: KubeAccess, nodes: list[str], workers: int = 8,
                 workdir: Path | None = None) -> None:
        self.access = access
        self.procs = PodProcesses(workdir, access.server, self._request, self._resync) \
            if workdir is not None else None
        self._latest: dict[str, dict[str, Any]] = {}  # uid -> newest pod object seen
        self.nodes = set(nodes)
        self.workers = workers
        self._ips: dict[str, str] = {}  # pod uid -> ip
        self._used: set[str] = set()
        self._next = 0
        self._pending: dict[str, dict[str, Any]] = {}  # uid -> latest pod object
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._session: aiohttp.ClientSession | None = None

    # ---- http --------------------------------------------------------------------------
    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    async def _request(self, method: str, path: str, body: Any = None,
                       content_type: str = "application/json") -> tuple[int, Any]:
        headers = {"Content-Type": content_type, **self.access.headers()}
        data = json.dumps(body) if body is not None else None
        async with self.http.request(method, self.access.server + path, data=data,
                                     headers=headers, ssl=self.access.ssl_context) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if text else None)

    # ---- nodes -------------------------------------------------------------------------
    async def register_nodes(self) -> None:
        for name in sorted(self.nodes):
            obj = node_object(name)
            status, _ = await self._request("POST", "/api/v1/nodes", obj)
            if status not in (201, 409):
                raise RuntimeError(f"node {name}: HTTP {status}")
            # Status on create may be dropped; set it through the status subresource.
            await self._request("PATCH", f"/api/v1/nodes/{name}/status",
                                {"status": obj["status"]}, "application/merge-patch+json")
            # The TaintNodesByCondition admission adds node.kubernetes.io/not-ready on create;
            # the node lifecycle controller (not run here) would lift it: do it ourselves.
            await self._request("PATCH", f"/api/v1/nodes/{name}", {"spec": {"taints": None}},
                                "application/merge-patch+json")

    # ---- ips ---------------------------------------------------------------------------
    def _assign_ip(self, uid: str, current: str | None) -> str:
        if uid in self._ips:
            return self._ips[uid]
        if current:
            ip = current
        else:
            while True:
                ip = pod_ip(self._next)
                self._next += 1
                if ip not in self._used:
                    break
        self._ips[uid] = ip
        self._used.add(ip)
        return ip

    def _release_ip(self, uid: str) -> None:
        ip = self._ips.pop(uid, None)
        if ip is not None:
            self._used.discard(ip)

    # ---- pods --------------------------------------------------------------------------
    def _offer(self, pod: dict[str, Any]) -> None:
        if pod.get("spec", {}).get("nodeName") not in self.nodes:
            return
        uid = pod["metadata"]["uid"]
        self._latest[uid] = pod
        if uid not in self._pending:
            self._queue.put_nowait(uid)
        self._pending[uid] = pod

    def _resync(self, uid: str) -> None:
        """A pod process became (un)ready: write its status again."""
        pod = self._latest.get(uid)
        if pod is not None:
            self._offer(pod)

    async def _forget(self, uid: str) -> None:
        self._latest.pop(uid, None)
        if self.procs is not None:
            await self.procs.stop(uid)

    async def _worker(self) -> None:
        while True:
            uid = await self._queue.get()
            pod = self._pending.pop(uid, None)
            if pod is None:
                continue
            try:
                await self._sync_pod(pod)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("pod %s: %s (will retry)", pod["metadata"]["name"], exc)
                await asyncio.sleep(0.5)
                if uid not in self._pending:
                    self._pending[uid] = pod
                    self._queue.put_nowait(uid)

    async def _sync_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid, ns, name = meta["uid"], meta["namespace"], meta["name"]
        base = f"/api/v1/namespaces/{ns}/pods/{name}"
        if meta.get("deletionTimestamp"):
            await self._forget(uid)
            body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                    "preconditions": {"uid": uid}}
            status, _ = await self._request("DELETE", base, body)
            if status in (200, 202, 404, 409):
                self._release_ip(uid)
            return
        status_obj = pod.get("status") or {}
        if status_obj.get("phase") in ("Succeeded", "Failed"):
            return
        containers_ready = (meta.get("annotations") or {}).get(READY_ANNOTATION, "true") != "false"
        ip = self._assign_ip(uid, status_obj.get("podIP"))
        restarts: dict[str, int] = {}
        if self.procs is not None and (self.procs.tracks(uid) or await self.procs.wanted(pod)):
            await self.procs.start(pod, ip)
            containers_ready = containers_ready and self.procs.ready(uid)
            restarts = self.procs.restarts(uid)
        old_conds = list(status_obj.get("conditions") or [])
        conds = {c["type"]: c.get("status") for c in old_conds}
        # Readiness gates (spec.readinessGates) work as with a real kubelet: Ready needs
        # each gate's condition (set by someone else on pods/status) to be True.
        gates = [g.get("conditionType") for g in pod.get("spec", {}).get("readinessGates") or []]
        want_ready = containers_ready and all(conds.get(g) == "True" for g in gates)
        ready_s = "True" if want_ready else "False"
        cready_s = "True" if containers_ready else "False"
        if (status_obj.get("phase") == "Running" and status_obj.get("podIP") == ip
                and conds.get("Ready") == ready_s and conds.get("ContainersReady") == cready_s):
            return
        now = _now()
        containers = [
            {"name": c["name"], "image": c.get("image", ""), "imageID": "",
             "ready": containers_ready,
             "restartCount": restarts.get(c["name"], 0), "started": True, "containerID": f"fake://{uid}/{c['name']}",
             "state": {"running": {"startedAt": now}}}
            for c in pod.get("spec", {}).get("containers", [])
        ]
        patch = {"status": {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": status_obj.get("startTime") or now,
            "conditions": [
                {"type": t, "status": s, "lastTransitionTime": now}
                for t, s in (("Initialized", "True"), ("PodScheduled", "True"),
                             ("ContainersReady", cready_s), ("Ready", ready_s))
            ] + [c for c in old_conds if c.get("type") not in _KUBELET_CONDITIONS],
            "containerStatuses": containers,
        }}
        status, body = await self._request("PATCH", base + "/status", patch,
                                           "application/merge-patch+json")
        if status >= 300 and status != 404:
            log.warning("patch %s/%s: HTTP %s %s", ns, name, status, body)

    async def _list(self) -> str:
        status, body = await self._request("GET", "/api/v1/pods")
        if status != 200:
            raise aiohttp.ClientError(f"list pods: HTTP {status}")
        live: set[str] = set()
        for pod in body["items"]:
            if pod.get("spec", {}).get("nodeName") in self.nodes:
                uid = pod["metadata"]["uid"]
                live.add(uid)
                ip = (pod.get("status") or {}).get("podIP")
                if ip and uid not in self._ips:
                    self._ips[uid] = ip
                    self._used.add(ip)
            self._offer(pod)
        for uid in [u for u in self._ips if u not in live]:
            self._release_ip(uid)
        return str(body["metadata"]["resourceVersion"])

    async def _watch(self, rv: str) -> str | None:
        """Follow pod events from `rv`; returns the last rv, or None when a relist is due."""
        url = (f"{self.access.server}/api/v1/pods?watch=1&allowWatchBookmarks=true"
               f"&timeoutSeconds=120&resourceVersion={rv}")
        timeout = aiohttp.ClientTimeout(total=None, sock_read=180)
        async with self.http.get(url, headers=self.access.headers(),
                                 ssl=self.access.ssl_context, timeout=timeout) as resp:
            if resp.status == 410:
                return None
            if resp.status != 200:
                raise aiohttp.ClientError(f"watch pods: HTTP {resp.status}")
            async for line in resp.content:
                if not line.strip():
                    continue
                ev = json.loads(line)
                obj = ev.get("object") or {}
                if ev.get("type") == "ERROR":
                    return None
                rv = obj.get("metadata", {}).get("resourceVersion", rv)
                if ev.get("type") == "DELETED":
                    uid = obj.get("metadata", {}).get("uid")
                    if uid:
                        self._release_ip(uid)
                        self._pending.pop(uid, None)
                        await self._forget(uid)
                elif ev.get("type") in ("ADDED", "MODIFIED"):
                    self._offer(obj)
        return rv

    async def run(self) -> None:
        self._session = aiohttp.ClientSession()
        workers = [asyncio.create_task(self._worker()) for _ in range(self.workers)]
        try:
            backoff = 0.2
            while True:
                try:
                    await self.register_nodes()
                    break
                except (aiohttp.ClientError, OSError, RuntimeError) as exc:
                    log.warning("register nodes: %s", exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
            log.info("nodes registered: %s", ", ".join(sorted(self.nodes)))
            rv: str | None = None
            backoff = 0.2
            while True:
                try:
                    if rv is None:
                        rv = await self._list()
                    rv = await self._watch(rv)
                    backoff = 0.2
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                    log.info("watch interrupted: %s; retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    rv = None
        finally:
            for w in workers:
                w.cancel()
            if self.procs is not None:
                await self.procs.stop_all()
            await self.http.close()


async def _main(args: argparse.Namespace) -> None:
    kubelet = FakeKubelet(load_kubeconfig(args.kubeconfig), args.nodes.split(","),
                          workdir=Path(args.workdir) if args.workdir else None)
    task = asyncio.create_task(kubelet.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--nodes", default="fake-node-1,fake-node-2")
    ap.add_argument("--workdir", default="",
                    help="run pods of run-labelled namespaces as processes, logs here")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s fake-kubelet %(levelname)s %(message)s")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
