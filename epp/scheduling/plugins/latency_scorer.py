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

PREDICTIONS_KEY = "latency-predictions"


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
        ttft = [
            model.predict_ttft_ms(ep, max(0, prompt - blocks.get(ep.key, 0) * block_tokens))
            for ep in endpoints
        ]
        predictions: dict[str, tuple[float, float]] = cycle.get(PREDICTIONS_KEY) or {}
        slo_ttft, slo_tpot = request.slo_ttft_ms, request.slo_tpot_ms
        tpot = [model.predict_tpot_ms(ep) for ep in endpoints]
        for ep, t, p in zip(endpoints, ttft, tpot, strict=True):
            predictions[ep.key] = (t, p)
        cycle.set(PREDICTIONS_KEY, predictions)
        if slo_ttft is None and slo_tpot is None:
            best = min(ttft)
            return [best / t if t > 0 else 1.0 for t in ttft]
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
