"""Failure learning: what the gateway's answer says about the endpoints the EPP named.

The gateway (manifests/gateway) walks the EPP's list `target,fallback,...` one host per
attempt, retrying connect failures and resets before the first response byte, and reports
the attempt count (`x-envoy-attempt-count`) and the host that answered
(`x-gateway-destination-endpoint-served`). From the response headers this hook concludes:

* hosts listed before the one that answered failed to connect or reset (unless the gateway
  made one attempt only: then it skipped them as unknown): they are marked unreachable for
  `holdSeconds` (a good metrics scrape clears the mark early);
* no host answered (the gateway's own 502/503/504 after every attempt): the hosts it tried
  are marked the same way;
* a host answered 5xx `errorBurst` times in a row: it cools off for `coolOffSeconds`.

The health filter skips marked endpoints, so the next requests avoid a dying pod without
waiting for the scraper (which independently marks a pod it cannot connect to).

Parameters: `holdSeconds` (5), `errorBurst` (5, 0 = off), `coolOffSeconds` (2).
"""

from __future__ import annotations

from epp import clock
from epp.datalayer.endpoint import Endpoint
from epp.requestcontrol.decision import Decision
from epp.requestcontrol.lifecycle import LifecycleHook

_GATEWAY_FAILURES = frozenset({502, 503, 504})


class FailureLearning(LifecycleHook):
    type_name = "failure-learning"

    def configure(self) -> None:
        self.hold = float(self.params.get("holdSeconds", 5.0))
        self.burst = int(self.params.get("errorBurst", 5))
        self.cool_off = float(self.params.get("coolOffSeconds", 2.0))
        if self.hold < 0 or self.cool_off < 0 or self.burst < 0:
            raise ValueError("failure-learning: parameters must not be negative")

    def response_headers(self, d: Decision, status: int) -> None:
        listed = d.result.primary
        now = clock.now()
        if d.served:
            failed = 0
            for i, ep in enumerate(listed):
                if ep.key == d.served:
                    failed = i
                    break
            else:  # answered by a host we did not list: nothing to conclude
                return
            # One attempt means the hosts before it were skipped (not yet known to the
            # gateway's cluster), not tried; an unknown count (0) trusts the order.
            if d.attempts != 1:
                for ep in listed[:failed]:
                    self._unreachable(ep, now)
            self._answered(listed[failed], status, now)
        elif status in _GATEWAY_FAILURES:
            # No upstream answered at all: every host the gateway tried failed.
            tried = d.attempts or 1
            for ep in listed[:tried]:
                self._unreachable(ep, now)

    def _unreachable(self, ep: Endpoint, now: float) -> None:
        h = ep.health
        if h.unreachable_until <= now:
            h.connect_failures += 1
        h.unreachable_until = max(h.unreachable_until, now + self.hold)

    def _answered(self, ep: Endpoint, status: int, now: float) -> None:
        h = ep.health
        if status < 500:
            h.consecutive_errors = 0
            return
        h.consecutive_errors += 1
        if self.burst and h.consecutive_errors >= self.burst:
            h.consecutive_errors = 0
            h.cool_off_until = now + self.cool_off
            h.error_bursts += 1
