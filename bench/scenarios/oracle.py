"""The oracle bound: what a router with perfect prefix reuse and perfect balance could get.

Computed, not run. Per request, TTFT floor = API overhead + one engine step + prefill of the
tokens no earlier request could have cached (the first request of a group pays for the
system prompt, later ones only for their question; a conversation turn only for its new
messages and the previous reply). Throughput bound = min(offered rate, pool capacity), where
capacity charges each request its uncached prefill plus its decode tokens at full batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.scenarios.workload import RequestSpec
from epp.sim.config import SimConfig
from epp.sim.tokenizer import encode, render_chat


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def oracle(
    pool: Sequence[SimConfig], schedule: Sequence[RequestSpec], rate: float
) -> dict[str, Any]:
    if not pool or not schedule:
        return {}
    c = pool[0]
    servers = sum(1 for p in pool if p.role in ("both", "decode")) or len(pool)
    seen_groups: set[str] = set()
    floors: list[float] = []
    work: list[float] = []
    prompt_total = 0
    reusable_total = 0
    outputs = 0
    batch = c.max_num_seqs
    for spec in schedule:
        new_tokens = len(encode(render_chat(spec.messages)))
        if spec.session and spec.session in seen_groups:
            uncached = new_tokens + spec.max_tokens  # the previous reply and the new turn
            prompt = new_tokens + spec.prefix_tokens
        elif spec.group and spec.prefix_tokens and spec.group in seen_groups:
            uncached = max(1, new_tokens - spec.prefix_tokens)
            prompt = new_tokens
        else:
            uncached = new_tokens
            prompt = new_tokens
        seen_groups.add(spec.session or spec.group)
        prompt_total += prompt
        reusable_total += prompt - uncached
        prefill = c.prefill_per_token_s * uncached
        floors.append(c.api_overhead_s + c.step_base_s + prefill)
        ctx = prompt + spec.max_tokens / 2
        step = c.step_base_s + c.decode_per_seq_s * batch + c.decode_per_ctx_token_s * batch * ctx
        work.append(prefill + spec.max_tokens * step / batch)
        outputs += spec.max_tokens
    n = len(schedule)
    capacity = servers / (sum(work) / n) if sum(work) > 0 else float("inf")
    achievable = min(rate, capacity)
    tpot_floor = c.step_base_s + c.decode_per_seq_s + c.decode_per_ctx_token_s * (prompt_total / n)
    return {
        "ttft_p50": _percentile(floors, 50),
        "ttft_p90": _percentile(floors, 90),
        "ttft_p99": _percentile(floors, 99),
        "tpot_floor": tpot_floor,
        "capacity_rps": capacity,
        "request_throughput": achievable,
        "output_throughput": achievable * outputs / n,
        "cached_ratio": reusable_total / prompt_total if prompt_total else 0.0,
    }
