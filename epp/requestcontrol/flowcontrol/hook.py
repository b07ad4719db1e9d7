"""The lifecycle hook that moves the queue: capacity may have freed when a request's
prefill finishes (its first token, or its predicted TTFT passed) or when it ends."""

from __future__ import annotations

from collections.abc import Callable

from epp.requestcontrol.decision import Decision
from epp.requestcontrol.lifecycle import LifecycleHook


class FlowDispatchHook(LifecycleHook):
    type_name = "flow-control-dispatch"

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__(self.type_name)
        self.notify = notify

    def prefill_done(self, d: Decision) -> None:
        self.notify()

    def release(self, d: Decision) -> None:
        self.notify()
