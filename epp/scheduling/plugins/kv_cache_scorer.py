"""Score by free KV-cache space (scraped utilisation, 0..1)."""

from __future__ import annotations

from collections.abc import Sequence

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.framework import Scorer
from epp.scheduling.request import CycleState, InferenceRequest


class KVCacheUtilizationScorer(Scorer):
    type_name = "kv-cache-utilization-scorer"

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        return [1.0 - min(1.0, max(0.0, ep.metrics.kv_usage)) for ep in endpoints]
