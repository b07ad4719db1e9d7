"""In-flight accounting: each endpoint's load as the EPP itself sent it, charged at pick time.

Charged in `pre_request` (requests, prompt + expected decode tokens, and the uncached prompt
tokens still to prefill on the prefilling endpoint, both as a count settled at the first
token and in the fluid prefill-queue model) and given back exactly once, so the load
signals every scorer reads are fresh for the next request of a burst and cannot leak.
The counter arithmetic is `InFlightCharges`, shared with replica sync (which charges the
same amounts into this instance's own ledger, to tell its peers).
"""

from __future__ import annotations

from typing import ClassVar

from epp.datalayer.endpoint import Endpoint, InFlight
from epp.requestcontrol.decision import Decision
from epp.requestcontrol.lifecycle import LifecycleHook
from epp.scheduling.framework import PREDICTIONS


class InFlightCharges:
    """What a request adds to its endpoints' InFlight counters, and takes back."""

    def counters(self, ep: Endpoint) -> InFlight:
        return ep.inflight

    def charge(self, d: Decision) -> None:
        res = d.result
        inf = self.counters(res.target)
        inf.requests += 1
        inf.tokens += d.charged_tokens
        inf.pending_requests += 1
        if res.prefill is not None:
            pf = self.counters(res.prefill)
            pf.prefill_requests += 1
            pf.prefill_tokens += res.uncached_tokens
        else:
            inf.pending_prefill_tokens += res.uncached_tokens

    def settle_prefill(self, d: Decision) -> None:
        res = d.result
        if res.prefill is not None:
            pf = self.counters(res.prefill)
            pf.prefill_requests -= 1
            pf.prefill_tokens -= res.uncached_tokens
            self.counters(res.target).pending_requests -= 1
        else:
            inf = self.counters(res.target)
            inf.pending_prefill_tokens -= res.uncached_tokens
            inf.pending_requests -= 1

    def uncharge(self, d: Decision) -> None:
        inf = self.counters(d.target)
        inf.requests -= 1
        inf.tokens -= d.charged_tokens


class InFlightAccounting(InFlightCharges, LifecycleHook):
    type_name = "inflight-accounting"
    # The predicted TTFT tells the protocol layer when to assume the prefill is done.
    consumes: ClassVar[frozenset[str]] = frozenset({PREDICTIONS})

    def pre_request(self, d: Decision) -> None:
        res = d.result
        prefilling = res.prefill or res.target
        self.services.latency.charge_backlog(prefilling, res.uncached_tokens, d.started)
        d.queue_position = prefilling.queue.charged_total
        self.charge(d)

    def first_token(self, d: Decision, now: float, learn: bool) -> None:
        res = d.result
        self.services.latency.settle_backlog(res.prefill or res.target, d.queue_position, now)

    def prefill_done(self, d: Decision) -> None:
        self.settle_prefill(d)

    def release(self, d: Decision) -> None:
        self.uncharge(d)
