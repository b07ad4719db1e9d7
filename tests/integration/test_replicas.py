"""Two EPP replicas behind one Envoy, sharing state over the sync protocol (real processes):

- SIGKILL one under steady load: only requests whose ext_proc stream was on it may fail;
  the survivor counted the dead one's in-flight requests and drops them after the peer
  timeout; the restarted replica converges to the survivor's view;
- a fail-open pool (BUFFERED body mode) keeps serving through a dead replica.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass

import aiohttp
import orjson

from epp.devstack.stack import GatewayHandle
from tests.integration.conftest import GatewayFactory, endpoint_dicts
from tests.integration.helpers import metric_samples

PEER_TIMEOUT = 1.5
SYNC_ARGS = ["--sync-peer-timeout", str(PEER_TIMEOUT), "--sync-snapshot-interval", "0.25"]


@dataclass
class Result:
    started: float
    status: int  # -1: the response broke off
    ended: float


async def _stream(s: aiohttp.ClientSession, gw: GatewayHandle, hold_ms: int) -> int:
    """A streamed completion whose first byte comes after `hold_ms`. The EPP counts a
    request in flight until the model server's response headers (the end of its ext_proc
    stream when only response headers are sent to it)."""
    body = orjson.dumps(
        {"model": "m", "prompt": "x " * 200, "stream": True, "n_chunks": 3, "chunk_ms": 20,
         "hold_ms": hold_ms}
    )  # fmt: skip
    try:
        async with s.post(
            gw.url + "/v1/completions", data=body, headers={"content-type": "application/json"}
        ) as r:
            await r.read()
            return r.status
    except aiohttp.ClientError:
        return -1


async def _load(
    gw: GatewayHandle, rate: float, seconds: float, events: dict[float, object]
) -> list[Result]:
    """Open-loop load at `rate` req/s; `events` maps a time offset to a coroutine to run."""
    results: list[Result] = []
    async with aiohttp.ClientSession() as s:

        async def one() -> None:
            t0 = time.monotonic()
            status = await _stream(s, gw, 300)
            results.append(Result(t0, status, time.monotonic()))

        tasks = []
        start = time.monotonic()
        pending = sorted(events.items(), key=lambda kv: kv[0])
        while time.monotonic() - start < seconds:
            while pending and time.monotonic() - start >= pending[0][0]:
                await pending.pop(0)[1]  # type: ignore[misc]
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(1.0 / rate)
        await asyncio.gather(*tasks)
    return results


async def _inflight_by_endpoint(gw: GatewayHandle, index: int) -> dict[str, float]:
    text = await gw.metrics_text(index)
    return {labels["endpoint"]: v for labels, v in metric_samples(text, "epp_inflight_requests")}


async def test_killing_one_of_two_replicas(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    gw = await gateway(endpoint_dicts(echo_pool), epp_processes=2, epp_args=SYNC_ARGS)
    seen: dict[str, float] = {}

    async def kill() -> None:
        state = await gw.sync_state(0)
        seen["dead_inflight"] = state["peers"]["epp-1/0"]["requests"]
        os.killpg(gw.epp_procs[1].pid, signal.SIGKILL)
        seen["killed_at"] = time.monotonic()

    results = await _load(gw, 25, 6.0, {2.5: kill()})
    killed_at = seen["killed_at"]
    # The survivor was counting the dead replica's requests (its view is pool-wide).
    assert seen["dead_inflight"] >= 1
    failed = [r for r in results if r.status != 200]
    # Only streams that were on the dead replica fail: those in flight at the kill (their
    # gRPC stream broke) and the first ones Envoy sent before ejecting it.
    assert len(failed) <= seen["dead_inflight"] + 2, failed
    assert all(r.started < killed_at + 1.0 for r in failed), failed
    print(f"{len(results)} requests, {len(failed)} failed, {seen['dead_inflight']} on the dead one")
    late = [r for r in results if r.started > killed_at + 1.0]
    assert late and all(r.status == 200 for r in late)

    # The dead replica's in-flight requests expired from the survivor's view.
    state = await gw.sync_state(0)
    print(f"survivor stats: {state['stats']}")
    assert "epp-1/0" not in state["peers"]
    assert state["stats"]["expired"] >= 1
    assert sum((await _inflight_by_endpoint(gw, 0)).values()) == 0

    # Restarted: it converges to the survivor's view while requests are in flight.
    await gw.restart_epp(1)
    async with aiohttp.ClientSession() as s:
        held = [asyncio.create_task(_stream(s, gw, 4000)) for _ in range(6)]
        start = time.monotonic()
        while True:
            views = [await _inflight_by_endpoint(gw, i) for i in (0, 1)]
            if views[0] == views[1] and sum(views[0].values()) == 6:
                break
            assert time.monotonic() - start < 2.5, views
            await asyncio.sleep(0.02)
        converged_s = time.monotonic() - start
        assert all(status == 200 for status in await asyncio.gather(*held))
    print(f"restarted replica converged in {converged_s:.3f} s")
    for i in (0, 1):
        assert sum((await _inflight_by_endpoint(gw, i)).values()) == 0


async def test_fail_open_pool_serves_through_a_dead_replica(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    """Envoy 1.40 fails open only in BUFFERED mode (not FULL_DUPLEX_STREAMED): requests
    whose ext_proc stream dies go on unprocessed; the upstream's fallback picks any pod."""
    gw = await gateway(
        endpoint_dicts(echo_pool),
        epp_processes=2,
        epp_args=SYNC_ARGS,
        body_mode="BUFFERED",
        envoy_overrides={"fail_open": True},
    )

    async def kill() -> None:
        os.killpg(gw.epp_procs[1].pid, signal.SIGKILL)

    results = await _load(gw, 25, 4.0, {1.5: kill()})
    assert len(results) >= 60
    assert [r for r in results if r.status != 200] == []


async def test_workers_share_the_port_and_their_state(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    """`epp serve --workers 2`: both workers take streams on the one ext_proc port, each
    sees the other's load, and the supervisor restarts a worker that dies."""
    gw = await gateway(endpoint_dicts(echo_pool), epp_workers=2, epp_args=SYNC_ARGS)
    base = gw.metrics_ports[0]

    async def served(port: int) -> float:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
        return sum(v for _, v in metric_samples(text, "inference_objective_request_total"))

    async def debug(port: int) -> dict[str, object]:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/debug/sync") as r:
            data: dict[str, object] = await r.json()
            return data

    async with aiohttp.ClientSession() as s:
        statuses = await asyncio.gather(*[_stream(s, gw, 50) for _ in range(80)])
    assert all(st == 200 for st in statuses)
    counts = [await served(base + i) for i in (0, 1)]
    assert sum(counts) >= 80 and min(counts) > 0, counts  # the kernel spread the connections
    for i in (0, 1):
        peers = (await debug(base + i))["peers"]
        assert isinstance(peers, dict) and len(peers) == 1

    # A worker dies: the supervisor starts it again and the pair syncs again.
    state = await debug(base + 1)
    pid = int(str(state["pid"]))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        try:
            again = await debug(base + 1)
            if again["pid"] != pid and again["peers"]:
                break
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, "worker 1 did not come back"
        await asyncio.sleep(0.1)
