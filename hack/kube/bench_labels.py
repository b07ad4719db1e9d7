"""EPP cost with many pods and label churn (figure for bench/RESULTS.md).

    python -m hack.kube.bench_labels [--pods 1000] [--rate 50] [--seconds 20] [--kubeconfig K]

Starts the project's test cluster (unless --kubeconfig), creates `--pods` pods bound to the
fake nodes (they get loopback IPs from the fake kubelet), an InferencePool selecting them,
then `epp serve --pool-name` (metrics scraping off: the pods have no servers). Once the EPP
is ready it relabels pods (`business`) at `--rate` changes/s for `--seconds`, and reports
the EPP's sync time, CPU use and memory (RSS, peak) before and during the churn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from epp.datalayer.datastore import Datastore
from epp.datalayer.kube_source import KubeSource
from hack.kube import cluster as kc
from hack.kube.kubeconfig import KubeAccess, load_kubeconfig

NS = "bench-labels"
TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _proc_mem(pid: int) -> tuple[float, float]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


async def _req(http: aiohttp.ClientSession, acc: KubeAccess, method: str, path: str,
               body: Any, ctype: str = "application/json") -> int:
    async with http.request(method, acc.server + path, data=json.dumps(body),
                            headers={"Content-Type": ctype, **acc.headers()},
                            ssl=acc.ssl_context) as resp:
        await resp.read()
        return resp.status


async def create_pods(acc: KubeAccess, n: int, parallel: int = 16) -> None:
    sem = asyncio.Semaphore(parallel)
    async with aiohttp.ClientSession() as http:
        async def one(i: int) -> None:
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": f"sim-{i:04d}", "labels": {
                       "app": "sim", "model": "llama", "business": f"b{i % 5}",
                       "role": "decode"}},
                   "spec": {"nodeName": kc.FAKE_NODES[i % len(kc.FAKE_NODES)],
                            "terminationGracePeriodSeconds": 0,
                            "containers": [{"name": "engine", "image": "fake"}]}}
            async with sem:
                status = await _req(http, acc, "POST", f"/api/v1/namespaces/{NS}/pods", pod)
                if status not in (201, 409):
                    raise RuntimeError(f"create pod {i}: HTTP {status}")
        await asyncio.gather(*(one(i) for i in range(n)))


async def churn(acc: KubeAccess, n_pods: int, rate: float, seconds: float,
                pending: dict[str, tuple[str, float]] | None = None) -> int:
    """Relabel pods round-robin at `rate`/s; returns the number of changes made. Each change
    is recorded in `pending` (pod name -> (business, time sent)) for a lag probe."""
    done = 0
    start = time.monotonic()
    async with aiohttp.ClientSession() as http:
        tasks: set[asyncio.Task[int]] = set()
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate) + 1
            while done < due:
                i = done % n_pods
                business = f"b{(done // n_pods + i + 1) % 5}"
                body = {"metadata": {"labels": {"business": business}}}
                if pending is not None:
                    pending[f"sim-{i:04d}"] = (business, time.monotonic())
                t = asyncio.create_task(_req(http, acc, "PATCH",
                                             f"/api/v1/namespaces/{NS}/pods/sim-{i:04d}", body,
                                             "application/merge-patch+json"))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                done += 1
            await asyncio.sleep(0.005)
        if tasks:
            await asyncio.gather(*tasks)
    return done


async def wait_ready(url: str, proc: asyncio.subprocess.Process, timeout: float) -> float:
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http:
        while time.monotonic() - t0 < timeout:
            if proc.returncode is not None:
                raise RuntimeError("epp exited")
            try:
                async with http.get(url) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError("epp not ready")


async def run(args: argparse.Namespace, cluster: kc.Cluster) -> dict[str, Any]:
    acc = load_kubeconfig(cluster.kubeconfig)
    cluster.create_namespace(NS)
    cluster.apply(f"""
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {{name: pool, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: sim}}}}
  targetPorts: [{{number: 8000}}]
  endpointPickerRef: {{name: epp, port: {{number: 9002}}}}
""")
    t0 = time.monotonic()
    await create_pods(acc, args.pods)
    while True:
        out = cluster.kubectl("get", "pods", "-n", NS, "-o",
                              "jsonpath={range .items[*]}{.status.podIP}{'\\n'}{end}")
        if sum(1 for line in out.splitlines() if line.strip()) >= args.pods:
            break
        await asyncio.sleep(0.5)
    pods_ready = time.monotonic() - t0
    ports = [kc.free_port() for _ in range(3)]
    log = tempfile.NamedTemporaryFile(prefix="epp-bench-", suffix=".log", delete=False)  # noqa: SIM115
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp.cli", "serve", "--pool-name", "pool", "--pool-namespace", NS,
        "--kubeconfig", str(cluster.kubeconfig), "--scrape-interval", "0",
        "--grpc-port", str(ports[0]), "--grpc-health-port", str(ports[1]),
        "--metrics-port", str(ports[2]), "--log-level", "warning",
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # A probe in this process (same data-layer code) measures event lag under the churn.
    ds = Datastore()
    probe = KubeSource(ds, "pool", NS, kubeconfig=str(cluster.kubeconfig))
    await probe.start()
    pending: dict[str, tuple[str, float]] = {}
    lags: list[float] = []
    try:
        await ds.wait_synced(60)
        by_name = {ep.name: ep for ep in ds.endpoints()}

        def on_change() -> None:
            now = time.monotonic()
            for name, (business, sent) in list(pending.items()):
                ep = by_name.get(name)
                if ep is not None and ep.business == business:
                    lags.append(now - sent)
                    del pending[name]

        ds.on_change(on_change)
        sync_s = await wait_ready(f"http://127.0.0.1:{ports[2]}/readyz", proc, 120)
        await asyncio.sleep(2.0)
        idle_cpu0, t_idle = _proc_cpu(proc.pid), time.monotonic()
        await asyncio.sleep(5.0)
        idle_cpu = (_proc_cpu(proc.pid) - idle_cpu0) / (time.monotonic() - t_idle)
        rss_synced, _ = _proc_mem(proc.pid)
        cpu0, w0 = _proc_cpu(proc.pid), time.monotonic()
        changes = await churn(acc, args.pods, args.rate, args.seconds, pending)
        await asyncio.sleep(1.0)  # let the last events land
        wall = time.monotonic() - w0
        churn_cpu = (_proc_cpu(proc.pid) - cpu0) / wall
        rss, hwm = _proc_mem(proc.pid)
    finally:
        await probe.stop()
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
    return {
        "pods": args.pods, "pods_created_and_running_s": round(pods_ready, 1),
        "epp_start_to_ready_s": round(sync_s, 2),
        "idle_cpu_pct": round(idle_cpu * 100, 1), "rss_after_sync_mib": round(rss_synced, 1),
        "label_changes": changes, "rate_per_s": args.rate, "seconds": args.seconds,
        "churn_cpu_pct": round(churn_cpu * 100, 1), "rss_after_churn_mib": round(rss, 1),
        "peak_rss_mib": round(hwm, 1),
        "probe_changes_seen": len(lags), "probe_changes_missing": len(pending),
        "probe_lag_p50_ms": round(statistics.median(lags) * 1000, 1) if lags else None,
        "probe_lag_p99_ms": round(sorted(lags)[int(0.99 * (len(lags) - 1))] * 1000, 1)
        if lags else None,
        "epp_log": log.name,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--kubeconfig", type=Path, help="use this cluster instead of starting one")
    args = ap.parse_args()
    if args.kubeconfig:
        cluster = kc.external(args.kubeconfig)
    else:
        if not kc.build():
            sys.exit("kube binaries missing; run `make kube-build`")
        cluster = kc.start(Path(tempfile.mkdtemp(prefix="epp-bench-kube-")))
    try:
        print(json.dumps(asyncio.run(run(args, cluster)), indent=2))
    finally:
        if not args.kubeconfig:
            cluster.stop()


if __name__ == "__main__":
    main()
