"""Pods as local processes, for the fake kubelet (hack/kube/fake_kubelet.py).

Only in namespaces labelled `fake-kubelet.epp.dev/run=true`, and only containers of the
project's image (`epp:<tag>`, any registry): their `command`/`args` run as a process of
this checkout (`epp ...` -> `python -m epp.cli ...`). What a real kubelet would give them is
approximated, and named here as the fake it is:
- no network namespace: every pod has its own loopback IP (127.0.x.y); an argument that is
  `0.0.0.0` (or ends in `=0.0.0.0`) becomes the pod IP, so the process listens where the
  pod's Service endpoints point;
- `$(VAR)` in command/args expands from the container's env (`value`, or `valueFrom.fieldRef`
  for metadata.name / metadata.namespace / status.podIP / spec.serviceAccountName);
- the ServiceAccount token: a TokenRequest for the pod's ServiceAccount, written into a
  kubeconfig that `KUBECONFIG` points at (a process is not "in cluster" here), so the process
  has exactly the pod's RBAC;
- readiness: the process is alive and its `readinessProbe.httpGet` answers 2xx on the pod
  IP (no probe: alive is enough); a process that exits is restarted with backoff (1, 2, 4 ..
  10 s), `restartCount` counts it. Volumes, resources and security contexts are ignored.
Logs: `<workdir>/<namespace>_<pod>/<container>.log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

log = logging.getLogger("fake-kubelet")
RUN_LABEL = "fake-kubelet.epp.dev/run"
REPO = Path(__file__).resolve().parents[2]
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_FIELDS = {"metadata.name": ("metadata", "name"), "metadata.namespace": ("metadata", "namespace"),
           "spec.serviceAccountName": ("spec", "serviceAccountName")}


def runs_here(image: str) -> bool:
    """The project's image, under any registry and tag."""
    last = image.rsplit("/", 1)[-1]
    return last.split("@", 1)[0].split(":", 1)[0] == "epp"


def _field(pod: dict[str, Any], path: str, ip: str) -> str:
    if path == "status.podIP":
        return ip
    where = _FIELDS.get(path)
    if where is None:
        return ""
    return str((pod.get(where[0]) or {}).get(where[1]) or "")


def container_env(pod: dict[str, Any], c: dict[str, Any], ip: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for e in c.get("env") or []:
        ref = ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        env[e["name"]] = _field(pod, ref, ip) if ref else _VAR.sub(
            lambda m: env.get(m.group(1), m.group(0)), str(e.get("value", "")))
    return env


def argv_of(pod: dict[str, Any], c: dict[str, Any], ip: str) -> list[str]:
    env = container_env(pod, c, ip)
    argv = [*(c.get("command") or ["epp"]), *(c.get("args") or [])]
    argv = [_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), a) for a in argv]
    argv = [re.sub(r"(^|=)0\.0\.0\.0$", lambda m: m.group(1) + ip, a) for a in argv]
    if argv and argv[0] == "epp":
        argv = [sys.executable, "-m", "epp.cli", *argv[1:]]
    return argv


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Container:
    spec: dict[str, Any]
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    ready: bool = False


@dataclass
class _Pod:
    uid: str
    ip: str
    containers: list[_Container]
    task: asyncio.Task[None] | None = None
    ready: bool = False


class PodProcesses:
    """Starts, probes, restarts and stops the processes of run-labelled pods."""

    def __init__(self, workdir: Path, server: str, request: Callable[..., Awaitable[Any]],
                 on_change: Callable[[str], None], probe_period: float = 0.5) -> None:
        self.workdir = workdir
        self.server = server
        self._request = request  # FakeKubelet._request(method, path, body) -> (status, body)
        self._on_change = on_change  # uid -> resync that pod's status
        self.probe_period = probe_period
        self._pods: dict[str, _Pod] = {}
        self._ns_runs: dict[str, bool] = {}
        self._http: aiohttp.ClientSession | None = None

    async def wanted(self, pod: dict[str, Any]) -> bool:
        ns = pod["metadata"]["namespace"]
        if ns not in self._ns_runs:
            status, body = await self._request("GET", f"/api/v1/namespaces/{ns}")
            labels = ((body or {}).get("metadata") or {}).get("labels") or {} if status == 200 \
                else {}
            self._ns_runs[ns] = labels.get(RUN_LABEL) == "true"
        return self._ns_runs[ns] and any(
            runs_here(c.get("image", "")) for c in pod.get("spec", {}).get("containers", []))

    def tracks(self, uid: str) -> bool:
        return uid in self._pods

    def ready(self, uid: str) -> bool:
        p = self._pods.get(uid)
        return p is not None and p.ready

    def restarts(self, uid: str) -> dict[str, int]:
        p = self._pods.get(uid)
        return {c.spec["name"]: c.restarts for c in p.containers} if p else {}

    async def start(self, pod: dict[str, Any], ip: str) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if uid in self._pods:
            return
        pod_dir = self.workdir / f"{meta['namespace']}_{meta['name']}"
        pod_dir.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items()
                if not k.startswith("KUBERNETES_") and k != "KUBECONFIG"}
        base["PYTHONPATH"] = str(REPO)
        kubeconfig = await self._kubeconfig(pod, pod_dir)
        if kubeconfig:
            base["KUBECONFIG"] = str(kubeconfig)
        containers = []
        for c in pod.get("spec", {}).get("containers", []):
            if not runs_here(c.get("image", "")):
                continue
            env = {**base, **container_env(pod, c, ip), "POD_IP": ip}
            containers.append(_Container(c, argv_of(pod, c, ip), env,
                                         pod_dir / f"{c['name']}.log"))
        p = _Pod(uid, ip, containers)
        self._pods[uid] = p
        p.task = asyncio.create_task(self._supervise(p), name=f"pod {meta['name']}")
        log.info("pod %s/%s: running %d container(s) as processes on %s", meta["namespace"],
                 meta["name"], len(containers), ip)

    async def _kubeconfig(self, pod: dict[str, Any], pod_dir: Path) -> Path | None:
        spec = pod.get("spec", {})
        if spec.get("automountServiceAccountToken") is False:
            return None
        meta = pod["metadata"]
        sa = spec.get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": 7200, "boundObjectRef": {
                    "apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}}}
        status, res = await self._request(
            "POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token", body)
        if status >= 300:
            log.warning("pod %s: no token for ServiceAccount %s (HTTP %s)", meta["name"], sa,
                        status)
            return None
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "pod",
               "clusters": [{"name": "c", "cluster": {"server": self.server,
                                                     "insecure-skip-tls-verify": True}}],
               "users": [{"name": sa, "user": {"token": res["status"]["token"]}}],
               "contexts": [{"name": "pod", "context": {"cluster": "c", "user": sa,
                                                       "namespace": meta["namespace"]}}]}
        path = pod_dir / "kubeconfig"
        path.write_text(yaml.safe_dump(doc))
        return path

    def _launch(self, c: _Container) -> None:
        out = c.log_path.open("ab")
        try:
            c.proc = subprocess.Popen(c.argv, env=c.env, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=str(c.log_path.parent),
                                      start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            out.close()

    async def _probe(self, c: _Container, ip: str) -> bool:
        if c.proc is None or c.proc.poll() is not None:
            return False
        get = (c.spec.get("readinessProbe") or {}).get("httpGet")
        if not get:
            return True
        port = get.get("port")
        if isinstance(port, str):  # a named container port
            port = next((p["containerPort"] for p in c.spec.get("ports") or []
                         if p.get("name") == port), None)
        if self._http is None:
            self._http = aiohttp.ClientSession()
        try:
            async with self._http.get(f"http://{ip}:{port}{get.get('path', '/')}",
                                      timeout=aiohttp.ClientTimeout(total=1)) as r:
                return 200 <= r.status < 400
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _supervise(self, p: _Pod) -> None:
        while True:
            now = time.monotonic()
            for c in p.containers:
                if c.proc is not None and c.proc.poll() is not None:
                    log.warning("pod %s container %s exited with %s; restarting",
                                p.ip, c.spec["name"], c.proc.returncode)
                    c.proc = None
                    c.restarts += 1
                    c.next_start = now + min(10.0, 2.0 ** (c.restarts - 1))
                if c.proc is None and now >= c.next_start:
                    self._launch(c)
                c.ready = await self._probe(c, p.ip)
            ready = all(c.ready for c in p.containers)
            if ready != p.ready:
                p.ready = ready
                self._on_change(p.uid)
            await asyncio.sleep(self.probe_period)

    async def stop(self, uid: str) -> None:
        p = self._pods.pop(uid, None)
        if p is None:
            return
        if p.task is not None:
            p.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await p.task
        for c in p.containers:
            await asyncio.to_thread(_stop, c.proc)

    async def stop_all(self) -> None:
        for uid in list(self._pods):
            await self.stop(uid)
        if self._http is not None:
            await self._http.close()


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
