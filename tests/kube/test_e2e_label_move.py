"""End to end: `kubectl label pod ... business=x` moves `x-business: x` traffic through Envoy
and the EPP (watching the real API server) to the pod's loopback IP, under steady load,
with zero failed requests. Also measures label -> first request served by the moved pod."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from epp.devstack.procs import free_port
from epp.devstack.stack import start_gateway
from hack.kube.cluster import Cluster
from tests.kube.helpers import kubectl, pod_yaml, pool_yaml, until

MOVES = 20
WORKERS = 4
MAX_REQUESTS = 20_000
MAX_SECONDS = 60.0


@dataclass
class Result:
    sent: float
    done: float
    business: str
    status: int
    pod: str


async def _backend(ip: str, port: int, pod: str) -> web.AppRunner:
    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(
            {"id": "cmpl-1", "object": "text_completion", "model": body.get("model"),
             "choices": [{"index": 0, "text": pod, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}},
            headers={"x-pod": pod})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, ip, port).start()
    return runner


@pytest.fixture
async def backends(managed_cluster: Cluster, kube_ns: str) -> AsyncIterator[int]:
    """Pods a, b (business prod) and c (staging), each with a backend on its pod IP."""
    port = free_port()
    labels = {"app": "sim", "model": "llama"}
    await kubectl(managed_cluster, "apply", "-f", "-",
                  input=pool_yaml("pool", kube_ns, {"app": "sim"}, [port])
                  + "---" + pod_yaml("a", kube_ns, {**labels, "business": "prod"})
                  + "---" + pod_yaml("b", kube_ns, {**labels, "business": "prod"})
                  + "---" + pod_yaml("c", kube_ns, {**labels, "business": "staging"}))

    def ips() -> dict[str, str] | None:
        items = json.loads(managed_cluster.kubectl("get", "pods", "-n", kube_ns, "-o", "json"))
        found = {p["metadata"]["name"]: p["status"].get("podIP") for p in items["items"]}
        return found if len(found) == 3 and all(found.values()) else None

    pod_ips = await until(lambda: ips(), timeout=20, interval=0.2, what="pod IPs")
    runners = [await _backend(ip, port, name) for name, ip in pod_ips.items()]
    try:
        yield port
    finally:
        for r in runners:
            await r.cleanup()


async def _load(url: str, stop: asyncio.Event, results: list[Result], worker: int) -> None:
    business = "staging" if worker % 2 else "prod"
    payload = {"model": "llama", "prompt": "hello", "max_tokens": 1}
    deadline = time.monotonic() + MAX_SECONDS
    async with aiohttp.ClientSession() as http:
        while not stop.is_set() and len(results) < MAX_REQUESTS and time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                async with http.post(f"{url}/v1/completions", json=payload,
                                     headers={"x-business": business}) as resp:
                    await resp.read()
                    status, pod = resp.status, resp.headers.get("x-pod", "")
            except aiohttp.ClientError as exc:
                status, pod = 0, repr(exc)
            results.append(Result(sent, time.monotonic(), business, status, pod))


async def test_label_move_reroutes_traffic_with_zero_failures(
    managed_cluster: Cluster, kube_ns: str, backends: int
) -> None:
    gw = await start_gateway(
        [],
        epp_args=["--pool-name", "pool", "--pool-namespace", kube_ns,
                  "--kubeconfig", str(managed_cluster.kubeconfig)],
        scrape_interval=0,
    )
    async with gw:
        results: list[Result] = []
        stop = asyncio.Event()
        workers = [asyncio.create_task(_load(gw.url, stop, results, i)) for i in range(WORKERS)]
        try:
            await until(lambda: len(results) > 50, timeout=10, what="load running")
            delays: list[float] = []
            kubectl_times: list[float] = []
            after_kubectl: list[float] = []
            for i in range(MOVES):
                target = "staging" if i % 2 == 0 else "prod"
                t0 = time.monotonic()
                await kubectl(managed_cluster, "label", "pod/a", "-n", kube_ns, "--overwrite",
                              f"business={target}")
                kubectl_times.append(time.monotonic() - t0)

                def served(target: str = target, t0: float = t0) -> Result | None:
                    return next((r for r in reversed(results) if r.sent >= t0
                                 and r.business == target and r.pod == "a"), None)

                first = await until(served, timeout=5, interval=0.002,
                                    what=f"a serving {target}")
                # the earliest such response, not just the one found first
                first = min((r for r in results if r.sent >= t0 and r.business == target
                             and r.pod == "a"), key=lambda r: r.done, default=first)
                delays.append(first.done - t0)
                after_kubectl.append(first.done - t0 - kubectl_times[-1])
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.gather(*workers)

    failed = [r for r in results if r.status != 200]
    assert not failed, f"{len(failed)} of {len(results)} failed, e.g. {failed[:3]}"
    # Pods that never moved only ever served their own business.
    assert {r.pod for r in results if r.business == "staging"} <= {"a", "c"}
    assert {r.pod for r in results if r.business == "prod"} <= {"a", "b"}
    delays.sort()
    p50 = statistics.median(delays)
    p99 = delays[min(len(delays) - 1, round(0.99 * (len(delays) - 1)))]
    print(f"\nlabel->first request served by moved pod over {MOVES} moves: "
          f"p50={p50 * 1000:.0f}ms p99={p99 * 1000:.0f}ms max={max(delays) * 1000:.0f}ms "
          f"(kubectl itself p50={statistics.median(kubectl_times) * 1000:.0f}ms; after kubectl "
          f"returned p50={statistics.median(after_kubectl) * 1000:.1f}ms "
          f"max={max(after_kubectl) * 1000:.1f}ms); "
          f"{len(results)} requests, 0 failed")
    assert max(delays) < 1.0
