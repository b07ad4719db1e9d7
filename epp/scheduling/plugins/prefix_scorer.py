"""Prefix-cache affinity: how much of the prompt each endpoint probably has cached.

The score blends the matched *ratio* of the prompt with the matched *absolute* tokens
relative to the best candidate: 30% of a 100k-token prompt is worth more than 90% of a
100-token one. Parameters: `absoluteWeight` (0..1, default 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.framework import Scorer
from epp.scheduling.plugins.common import prefix_match
from epp.scheduling.request import CycleState, InferenceRequest


class PrefixCacheScorer(Scorer):
    type_name = "prefix-cache-scorer"

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        match = prefix_match(cycle, self.services, request)
        total = len(match.hashes)
        if total == 0 or not match.matched_blocks:
            return [0.0] * len(endpoints)
        blocks = match.matched_blocks
        matched = [blocks.get(ep.key, 0) for ep in endpoints]
        best = max(matched)
        if best == 0:
            return [0.0] * len(endpoints)
        w = float(self.params.get("absoluteWeight", 0.5))
        return [(1 - w) * m / total + w * m / best for m in matched]
