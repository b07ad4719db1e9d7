"""The clock-agnostic engine core: fused pure-decode runs (what the virtual-time simulator
uses) give exactly what stepping one step at a time gives."""

from __future__ import annotations

import random
from typing import Any

from epp.sim.config import make_config
from epp.sim.engine import EngineCore, Request
from epp.sim.metrics import EngineStats


def _requests(seed: int, n: int) -> list[tuple[float, list[int], int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(1000) for _ in range(64)]
    out = []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(20.0)
        prompt = shared + [rng.randrange(1000) for _ in range(rng.randrange(1, 90))]
        out.append((t, prompt, rng.randrange(1, 60)))
    return out


def _simulate(fuse: bool, **cfg: Any) -> tuple[list[tuple[Any, ...]], EngineCore]:
    core = EngineCore(make_config(**cfg), EngineStats())
    arrivals = _requests(7, 40)
    reqs: list[Request] = []
    now = 0.0
    i = 0
    while i < len(arrivals) or not core.idle:
        if core.idle:
            now = max(now, arrivals[i][0])
        while i < len(arrivals) and arrivals[i][0] <= now:
            at, ids, out = arrivals[i]
            r = Request(prompt_ids=ids, max_tokens=out, seed=i, arrival=at)
            core.add(r)
            reqs.append(r)
            i += 1
        batch = core.schedule(now)
        if not batch:
            assert core.fail_unschedulable(now)
            continue
        limit = core.decode_run_limit(batch) if fuse else 0
        if limit >= 2:
            n = len(batch)
            ctx0 = sum(len(r.tokens) for r, _ in batch)
            # Stop the run at the step in progress when the next request arrives.
            nxt = arrivals[i][0] if i < len(arrivals) else float("inf")
            j = 1
            while j < limit and now + core.run_duration(n, ctx0, j) < nxt:
                j += 1
            end = now + core.run_duration(n, ctx0, j)
            core.complete_run(batch, j, now)
            now = end
        else:
            dt = core.step_time(batch)
            now += dt * core.cfg.slow_factor
            core.complete(batch, now, dt)
    rows = [
        (r.rid - reqs[0].rid, r.error, r.tokens, round(r.first_token_at, 9),
         round(r.last_token_at, 9), r.num_cached)
        for r in reqs
    ]
    return rows, core


def test_fused_decode_runs_equal_single_steps() -> None:
    # Default shape, a KV cache small enough to preempt, and a slow pod.
    for cfg in ({}, {"num_gpu_blocks": 18, "max_num_seqs": 8}, {"slow_factor": 2.5}):
        base = {"block_size": 16, "max_num_batched_tokens": 128, **cfg}
        stepped, a = _simulate(False, **base)
        fused, b = _simulate(True, **base)
        assert fused == stepped
        assert a.steps == b.steps and b.fused_runs > 2
        if "num_gpu_blocks" in cfg:
            assert a.stats.preemptions > 5
        assert abs(a.busy_time - b.busy_time) < 1e-9
        sa, sb = a.stats, b.stats
        assert (sa.generation_tokens, sa.prefix_hits, sa.preemptions) == (
            sb.generation_tokens, sb.prefix_hits, sb.preemptions)
        assert sa.itl.n == sb.itl.n and abs(sa.itl.total - sb.itl.total) < 1e-9
        assert sa.itl.counts == sb.itl.counts
        # The prefix cache ends in the same state: same hashes, same LRU eviction order.
        assert set(a.pool._cached) == set(b.pool._cached)
        order_a = [blk.block_hash for blk in a.pool._free.values()]
        order_b = [blk.block_hash for blk in b.pool._free.values()]
        assert order_a == order_b


def test_a_run_never_crosses_an_admission() -> None:
    core = EngineCore(make_config(max_num_seqs=2), EngineStats())
    for k in range(3):
        core.add(Request(prompt_ids=list(range(k, k + 20)), max_tokens=30, arrival=0.0))
    now = 0.0
    batch = core.schedule(now)  # two prefills; the third waits for a free seat
    assert len(batch) == 2 and core.decode_run_limit(batch) == 0
    now += core.step_time(batch)
    core.complete(batch, now)
    batch = core.schedule(now)
    # Both decode and the third cannot be admitted (max_num_seqs): fusable until one ends.
    assert core.decode_run_limit(batch) == 29
