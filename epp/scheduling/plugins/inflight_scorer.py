"""Score by EPP-tracked in-flight load: requests and tokens, updated at pick time."""

from __future__ import annotations

from collections.abc import Sequence

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.framework import Scorer
from epp.scheduling.plugins.common import inverse_minmax, inverse_relative
from epp.scheduling.request import CycleState, InferenceRequest


class InFlightScorer(Scorer):
    """Parameters: `tokenWeight` (0..1, default 0.5) blends request count and token load;
    `requestFloor` (8) and `tokenFloor` (16384): loads below these count as light."""

    type_name = "inflight-scorer"

    def configure(self) -> None:
        self.request_floor = float(self.params.get("requestFloor", 8))
        self.token_floor = float(self.params.get("tokenFloor", 16384))

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        w = float(self.params.get("tokenWeight", 0.5))
        by_requests = inverse_relative(
            [
                max(float(ep.inflight.requests), ep.metrics.running + ep.metrics.waiting)
                for ep in endpoints
            ],
            self.request_floor,
        )
        if w <= 0:
            return by_requests
        by_tokens = inverse_relative(
            [float(ep.inflight.tokens) for ep in endpoints], self.token_floor
        )
        return [(1 - w) * r + w * t for r, t in zip(by_requests, by_tokens, strict=True)]


class ActiveRequestScorer(InFlightScorer):
    """llm-d's name for in-flight request scoring (request count only)."""

    type_name = "active-request-scorer"

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        return inverse_minmax([float(ep.inflight.requests) for ep in endpoints])
