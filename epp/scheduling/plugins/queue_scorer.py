"""Score by queue depth: the engine's waiting queue, corrected by what the EPP has in flight."""

from __future__ import annotations

from collections.abc import Sequence

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.framework import Scorer
from epp.scheduling.plugins.common import inverse_minmax
from epp.scheduling.request import CycleState, InferenceRequest


class QueueScorer(Scorer):
    type_name = "queue-scorer"

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        # The scrape lags; requests we sent but that have not reached their first byte are
        # the freshest view of the queue. Take whichever is larger.
        return inverse_minmax(
            [max(ep.metrics.waiting, float(ep.inflight.pending_requests)) for ep in endpoints]
        )
