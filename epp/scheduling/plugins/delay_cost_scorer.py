"""Delay-cost scoring: where does this request cost the pool the least time?

For each candidate the cost, in seconds, is what placing the request there would cost:

* its own predicted TTFT: the wait there plus its uncached prompt tokens there (prefix
  match) at the endpoint's prefill rate. The wait is the longer of the prefill queue ahead
  (a fluid model of the uncached tokens the EPP sent there, drained at the prefill rate)
  and, when the engine reports requests waiting that are not prefill work, the wait for a
  free sequence slot (waiting requests x decode time / running);
* the work it adds to the pool (`workWeight` x its prefill time there): whoever comes next
  waits behind that work somewhere, so a cache hit is worth more than its own TTFT;
* the decode batch running there, stalled while it prefills (`stallWeight` x running x
  its prefill time);
* the requests there still waiting for their first token (`pendingWeight` x pending x its
  prefill time): the engine runs prefills in chunks of a step's token budget, so a prompt
  queued behind another one can delay that one's first token by a whole step. Not
  charged for a tenant over its share of the pool (flow control marks it): its prompts
  stack on the pods it already keeps busy instead of spreading over the others' pods.
  Off by default (0): it helped bursts in virtual time and cost `hetero` its tail
  (bench/RESULTS.md §0);
* the cache it would evict: prompt blocks beyond what the endpoint's KV cache holds push
  out blocks other requests may need again (`evictionWeight` x their prefill time).

The score is best cost / cost. Prefix affinity falls out of the cost: a request whose
prefix is cached on a pod stays there until waiting there costs more than a cold prefill
elsewhere plus the work that cold prefill adds. A pod clearly slower than the fastest
(its decode speed from the engine's token-latency histogram over windows with no prefill
running, beyond a dead zone for noise) prefills proportionally slower and is charged the
extra decode time of the request.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp import clock
from epp.datalayer.endpoint import Endpoint
from epp.scheduling.framework import Scorer
from epp.scheduling.plugins.common import cached_tokens, prefix_match
from epp.scheduling.request import CycleState, InferenceRequest

SLOW_DEAD_ZONE = 1.25  # scraped TPOT this much above the fastest pod counts as slow


class DelayCostScorer(Scorer):
    type_name = "delay-cost-scorer"

    def configure(self) -> None:
        p = self.params
        self.work_weight = float(p.get("workWeight", 1.0))
        self.stall_weight = float(p.get("stallWeight", 0.5))
        self.eviction_weight = float(p.get("evictionWeight", 0.5))
        self.pending_weight = float(p.get("pendingWeight", 0.0))
        for name in ("workWeight", "stallWeight", "evictionWeight", "pendingWeight"):
            if float(p.get(name, 0.0)) < 0:
                raise ValueError(f"{self.type_name}: {name} must not be negative")

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        costs = self.costs(cycle, request, endpoints)
        best = min(costs)
        return [best / c if c > 0 else 1.0 for c in costs]

    def costs(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        services = self.services
        model = services.latency
        index = services.prefix_index
        now = clock.now()
        # Cached tokens per pod: exact from the engines' KV events where a precise prefix
        # scorer keeps that index, else the approximate guess (which also tells what a
        # prompt would add to a pod's cache).
        cached = cached_tokens(cycle, services, request)
        match = prefix_match(cycle, services, request)
        blocks = match.matched_blocks
        block_tokens = index.block_tokens
        prompt = request.prompt_tokens
        prompt_blocks = len(match.hashes)
        base_prior_ms = model.priors.ttft_base_ms
        decode_tokens = request.expected_decode_tokens
        ww, sw, ew = self.work_weight, self.stall_weight, self.eviction_weight
        pw = 0.0 if request.over_share else self.pending_weight
        # One pass for what needs every endpoint's figures (the fastest decode speed, the
        # best-held prefix), one for the costs: 1000 endpoints per pick is the design load.
        states = []
        ref_tpot = 0.0
        for ep in endpoints:
            speeds = model.speeds(ep, now)
            tpot = speeds[0]
            if tpot > 0.0 and (ref_tpot == 0.0 or tpot < ref_tpot):
                ref_tpot = tpot
            states.append((speeds, model.queue(ep, now, decode_tokens, speeds)))
        held = [cached.get(ep.key, 0) for ep in endpoints] if cached else [0] * len(endpoints)
        # When every pod holding the prompt's prefix has all its sequence slots taken, a cold
        # prefill elsewhere makes a second home for a prefix in demand: an investment for the
        # requests that follow, so its work is not charged as waste.
        best_held = max(held) if held else 0
        replicate = best_held * 2 >= prompt > 0 and all(
            st[1].slot_wait_s > 0 for st, h in zip(states, held, strict=True) if h >= best_held
        )
        slow_tpot = ref_tpot * SLOW_DEAD_ZONE
        out = []
        for ep, ((tpot, factor), q), hits in zip(endpoints, states, held, strict=True):
            rate = q.tokens_per_s
            uncached = prompt - hits if prompt > hits else 0
            own_s = uncached / rate
            cost = (ep.latency.ttft_base_ms or base_prior_ms * factor) / 1000.0 + q.wait_s + own_s
            if ref_tpot and tpot > slow_tpot:
                cost += decode_tokens * (tpot - ref_tpot) / 1000.0
            if own_s > 0.0:
                work = 0.0 if replicate and hits < best_held else ww
                per_s = work + sw * q.running
                if pw:
                    per_s += pw * ep.inflight.pending_requests
                cost += per_s * own_s
                if ew > 0.0:
                    new_blocks = prompt_blocks - (blocks.get(ep.key, 0) if blocks else 0)
                    over = index.blocks_held(ep.key) + new_blocks - index.capacity_for(ep)
                    if over > 0:
                        cost += (
                            ew * (over if over < new_blocks else new_blocks) * block_tokens / rate
                        )
            out.append(cost)
        return out
