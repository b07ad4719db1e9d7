"""Session affinity: send a session's requests back to the endpoint that served it last.

The session key is the `x-session-id` header (configurable via `header`) or the OpenAI
`user` field. Memory is bounded (`maxSessions`, LRU).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.framework import SchedulingResult, Scorer
from epp.scheduling.request import CycleState, InferenceRequest


class SessionAffinityScorer(Scorer):
    type_name = "session-affinity-scorer"

    def configure(self) -> None:
        self.max_sessions = int(self.params.get("maxSessions", 100_000))
        self._last: OrderedDict[str, str] = OrderedDict()

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        key = request.session_key
        last = self._last.get(key) if key else None
        if last is None:
            return [0.0] * len(endpoints)
        return [1.0 if ep.key == last else 0.0 for ep in endpoints]

    def on_picked(
        self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult
    ) -> None:
        key = request.session_key
        if not key:
            return
        self._last[key] = result.target.key
        self._last.move_to_end(key)
        if len(self._last) > self.max_sessions:
            self._last.popitem(last=False)
