"""SLO-aware scoring from the latency model.

Each endpoint's TTFT is predicted from its queued prefill work plus this request's uncached
tokens there (prefix match), and its TPOT from its decode batch. With SLO headers
(`x-slo-ttft-ms`, `x-slo-tpot-ms`) endpoints that meet the SLO score above 0.5, in
proportion to their headroom; without them, the score is best cost / cost, where cost is the
predicted TTFT plus the prefill work the request adds (see `workWeight`): a cache- and
load-aware scorer that keeps prefix groups together until a pod is really overloaded.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.framework import Scorer
from epp.scheduling.plugins.common import cached_tokens
from epp.scheduling.request import CycleState, InferenceRequest

SLOW_DEAD_ZONE = 1.25  # scraped TPOT this much above the fastest pod counts as slow


def _headroom(slo: float, predicted: float) -> float:
    if predicted <= slo:
        return 0.5 + 0.5 * (slo - predicted) / slo
    return 0.5 * slo / predicted


class LatencyScorer(Scorer):
    """Parameters: `workWeight` (default 1.0): without SLO headers an endpoint's cost is its
    predicted TTFT plus `workWeight` × the prefill time the request adds to the pool there
    (its uncached tokens). Without that term a request would leave a pod that holds its
    prefix as soon as a cold prefill elsewhere is about as fast as waiting here, which splits
    prefix groups, multiplies prefill work and costs throughput under load."""

    type_name = "latency-scorer"

    def configure(self) -> None:
        self.work_weight = float(self.params.get("workWeight", 1.0))
        if self.work_weight < 0:
            raise ValueError("latency-scorer: workWeight must not be negative")

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        model = self.services.latency
        cached = cached_tokens(cycle, self.services, request)
        prompt = request.prompt_tokens
        pr = model.priors
        prior_rate, prior_base, unknown = (
            pr.prefill_ms_per_token, pr.ttft_base_ms, pr.unknown_queue_tokens
        )
        work_weight = self.work_weight
        # Decode speed the engines report (scraped TPOT): the fastest is the reference; a
        # pod clearly slower than it (beyond a dead zone for noise) is charged the extra
        # decode time of this request and prefills proportionally slower.
        known = [ep.metrics.tpot_recent_ms for ep in endpoints if ep.metrics.tpot_recent_ms > 0]
        ref_tpot = min(known) if known else 0.0
        decode_tokens = request.expected_decode_tokens
        # The hot loop of the picker on big pools: LatencyModel.predict_ttft_ms, inlined.
        ttft = []
        cost = []
        for ep in endpoints:
            lat, inf = ep.latency, ep.inflight
            queued = inf.pending_prefill_tokens + inf.prefill_tokens
            extra = ep.metrics.waiting - inf.pending_requests
            if extra > 0:
                queued += int(extra * (lat.uncached_tokens or unknown))
            uncached = prompt - cached.get(ep.key, 0) if cached else prompt
            if uncached < 0:
                uncached = 0
            rate = lat.prefill_ms_per_token or prior_rate
            extra_decode = 0.0
            ep_tpot = ep.metrics.tpot_recent_ms
            if ref_tpot and ep_tpot > ref_tpot * SLOW_DEAD_ZONE:
                rate *= ep_tpot / ref_tpot
                extra_decode = decode_tokens * (ep_tpot - ref_tpot)
            t = (lat.ttft_base_ms or prior_base) + rate * (uncached + queued)
            ttft.append(t)
            cost.append(t + work_weight * rate * uncached + extra_decode)
        slo_ttft, slo_tpot = request.slo_ttft_ms, request.slo_tpot_ms
        if slo_ttft is None and slo_tpot is None:
            best = min(cost)
            return [best / c if c > 0 else 1.0 for c in cost]
        tpot = [model.predict_tpot_ms(ep) for ep in endpoints]
        scores = []
        for t, p in zip(ttft, tpot, strict=True):
            parts = []
            if slo_ttft is not None and slo_ttft > 0:
                parts.append(_headroom(slo_ttft, t))
            if slo_tpot is not None and slo_tpot > 0:
                parts.append(_headroom(slo_tpot, p))
            scores.append(min(parts) if parts else 1.0)
        return scores


class SLOScorer(LatencyScorer):
    type_name = "slo-scorer"
