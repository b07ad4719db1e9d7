"""SLO-aware scoring from the latency model.

Each endpoint's TTFT is predicted from its queued prefill work plus this request's uncached
tokens there (prefix match), and its TPOT from its decode batch. With SLO headers
(`x-slo-ttft-ms`, `x-slo-tpot-ms`) endpoints that meet the SLO score above 0.5, in
proportion to their headroom; without them, the score is best predicted TTFT / predicted
TTFT, which makes this a cache- and load-aware "fastest first token" scorer.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.framework import Scorer
from epp.scheduling.plugins.common import prefix_match
from epp.scheduling.request import CycleState, InferenceRequest


def _headroom(slo: float, predicted: float) -> float:
    if predicted <= slo:
        return 0.5 + 0.5 * (slo - predicted) / slo
    return 0.5 * slo / predicted


class LatencyScorer(Scorer):
    type_name = "latency-scorer"

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        model = self.services.latency
        match = prefix_match(cycle, self.services, request)
        block_tokens = self.services.prefix_index.block_tokens
        blocks = match.matched_blocks
        prompt = request.prompt_tokens
        pr = model.priors
        prior_rate, prior_base, unknown = (
            pr.prefill_ms_per_token, pr.ttft_base_ms, pr.unknown_queue_tokens
        )
        # The hot loop of the picker on big pools: LatencyModel.predict_ttft_ms, inlined.
        ttft = []
        for ep in endpoints:
            lat, inf = ep.latency, ep.inflight
            queued = inf.pending_prefill_tokens + inf.prefill_tokens
            extra = ep.metrics.waiting - inf.pending_requests
            if extra > 0:
                queued += int(extra) * unknown
            uncached = prompt - blocks.get(ep.key, 0) * block_tokens if blocks else prompt
            ttft.append(
                (lat.ttft_base_ms or prior_base)
                + (lat.prefill_ms_per_token or prior_rate) * (max(0, uncached) + queued)
            )
        slo_ttft, slo_tpot = request.slo_ttft_ms, request.slo_tpot_ms
        if slo_ttft is None and slo_tpot is None:
            best = min(ttft)
            return [best / t if t > 0 else 1.0 for t in ttft]
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
