"""In-flight accounting: each endpoint's load as the EPP itself sent it, charged at pick time.

Charged in `pre_request` (requests, prompt + expected decode tokens, and the uncached prompt
tokens still to prefill on the prefilling endpoint, both as a count settled at the first
token and in the fluid prefill-queue model) and given back exactly once, so the load
signals every scorer reads are fresh for the next request of a burst and cannot leak.
"""

from __future__ import annotations

from typing import ClassVar

from epp.requestcontrol.decision import Decision
from epp.requestcontrol.lifecycle import LifecycleHook
from epp.scheduling.framework import PREDICTIONS


class InFlightAccounting(LifecycleHook):
    type_name = "inflight-accounting"
    # The predicted TTFT tells the protocol layer when to assume the prefill is done.
    consumes: ClassVar[frozenset[str]] = frozenset({PREDICTIONS})

    def pre_request(self, d: Decision) -> None:
        res = d.result
        prefilling = res.prefill or res.target
        self.services.latency.charge_backlog(prefilling, res.uncached_tokens, d.started)
        d.queue_position = prefilling.queue.charged_total
        inf = res.target.inflight
        inf.requests += 1
        inf.tokens += d.charged_tokens
        inf.pending_requests += 1
        if res.prefill is not None:
            pf = res.prefill.inflight
            pf.prefill_requests += 1
            pf.prefill_tokens += res.uncached_tokens
        else:
            inf.pending_prefill_tokens += res.uncached_tokens

    def first_token(self, d: Decision, now: float, learn: bool) -> None:
        res = d.result
        self.services.latency.settle_backlog(res.prefill or res.target, d.queue_position, now)

    def prefill_done(self, d: Decision) -> None:
        res = d.result
        if res.prefill is not None:
            pf = res.prefill.inflight
            pf.prefill_requests -= 1
            pf.prefill_tokens -= res.uncached_tokens
        else:
            res.target.inflight.pending_prefill_tokens -= res.uncached_tokens
        res.target.inflight.pending_requests -= 1

    def release(self, d: Decision) -> None:
        inf = d.target.inflight
        inf.requests -= 1
        inf.tokens -= d.charged_tokens
