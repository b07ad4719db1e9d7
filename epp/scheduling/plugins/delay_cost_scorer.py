"""Delay-cost scoring: where does this request cost the pool the least time?

For each candidate the cost, in seconds, is what placing the request there would cost:

* its own predicted TTFT: the prefill queue ahead of it (a fluid model of the prefill work
  the EPP sent there, drained at the endpoint's prefill rate, corrected by the engine's
  reported waiting queue) plus its uncached prompt tokens there (prefix match);
* the delay it imposes on others: requests that will arrive there while its prefill is
  still ahead of them (`queueWeight`, from the endpoint's recent pick rate), and the decode
  batch running there, stalled while it prefills (`stallWeight`);
* the cache it would evict: prompt blocks beyond what the endpoint's KV cache holds push
  out blocks other requests may need again (`evictionWeight`).

The score is best cost / cost. Prefix affinity falls out of the cost: a request whose
prefix is cached on a pod stays there until waiting behind that pod's queue costs more
than a cold prefill elsewhere plus what the cold prefill does to everybody else.
A pod clearly slower than the fastest (scraped TPOT, beyond a dead zone for noise) prefills
proportionally slower and is charged the extra decode time of the request.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp import clock
from epp.datalayer.endpoint import Endpoint
from epp.scheduling.framework import Scorer
from epp.scheduling.plugins.common import prefix_match
from epp.scheduling.request import CycleState, InferenceRequest

SLOW_DEAD_ZONE = 1.25  # scraped TPOT this much above the fastest pod counts as slow
METRICS_FRESH_S = 0.25  # scraped queue sizes older than this are ignored


class DelayCostScorer(Scorer):
    type_name = "delay-cost-scorer"

    def configure(self) -> None:
        p = self.params
        self.queue_weight = float(p.get("queueWeight", 1.0))
        self.stall_weight = float(p.get("stallWeight", 0.5))
        self.eviction_weight = float(p.get("evictionWeight", 0.5))
        for name in ("queueWeight", "stallWeight", "evictionWeight"):
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
        match = prefix_match(cycle, services, request)
        blocks = match.matched_blocks
        block_tokens = index.block_tokens
        prompt = request.prompt_tokens
        prompt_blocks = len(match.hashes)
        pr = model.priors
        known = [ep.metrics.tpot_recent_ms for ep in endpoints if ep.metrics.tpot_recent_ms > 0]
        ref_tpot = min(known) if known else 0.0
        decode_tokens = request.expected_decode_tokens
        qw, sw, ew = self.queue_weight, self.stall_weight, self.eviction_weight
        out = []
        for ep in endpoints:
            lat, inf, m = ep.latency, ep.inflight, ep.metrics
            slow = 1.0
            extra_decode_s = 0.0
            tpot = m.tpot_recent_ms
            if ref_tpot and tpot > ref_tpot * SLOW_DEAD_ZONE:
                slow = tpot / ref_tpot
                extra_decode_s = decode_tokens * (tpot - ref_tpot) / 1000.0
            rate = model.prefill_tokens_per_s(ep, slow)
            backlog = model.backlog_tokens(ep, now, rate)
            if m.waiting > 0 and now - m.updated_at <= METRICS_FRESH_S:
                # Work the engine reports queued beyond what the EPP's model still counts.
                typical = lat.uncached_tokens or pr.unknown_queue_tokens
                backlog = max(backlog, m.waiting * typical)
            matched = blocks.get(ep.key, 0) if blocks else 0
            uncached = prompt - matched * block_tokens
            if uncached < 0:
                uncached = 0
            wait_s = backlog / rate
            own_s = uncached / rate
            base_s = (lat.ttft_base_ms or pr.ttft_base_ms) / 1000.0
            cost = base_s + wait_s + own_s + extra_decode_s
            if own_s > 0.0:
                # Others queue behind this prefill while it is ahead of them...
                cost += qw * model.pick_rate(ep, now) * (wait_s + own_s) * own_s
                # ...and the decode batch running there stalls while it prefills.
                running = max(float(inf.requests), m.running)
                cost += sw * running * own_s
                if ew > 0.0:
                    new_blocks = prompt_blocks - matched
                    over = index.blocks_held(ep.key) + new_blocks - index.capacity_for(ep)
                    if over > 0:
                        cost += ew * min(over, new_blocks) * block_tokens / rate
            out.append(cost)
        return out
