"""Admission: is the pool saturated, and may this request be shed?

A candidate endpoint is saturated when its engine reports a deep queue and a nearly full KV
cache (fresh metrics only), or when the EPP already has `max_inflight_per_endpoint`
requests in flight on it. The pool is saturated when every candidate is. Sheddable
requests (priority < 0) are rejected with 429 then; others are queued by the engines.
"""

from __future__ import annotations

from dataclasses import dataclass

from epp import clock
from epp.datalayer.endpoint import Endpoint


@dataclass(slots=True)
class SaturationPolicy:
    queue_threshold: float = 5.0
    kv_threshold: float = 0.8
    metrics_stale_after: float = 0.2  # seconds; older metrics do not count as saturation
    max_inflight_per_endpoint: int = 0  # 0 = no EPP-side limit

    def endpoint_saturated(self, ep: Endpoint, now: float) -> bool:
        limit = self.max_inflight_per_endpoint
        if limit and ep.inflight.requests >= limit:
            return True
        m = ep.metrics
        return (
            m.age(now) <= self.metrics_stale_after
            and m.waiting >= self.queue_threshold
            and m.kv_usage >= self.kv_threshold
        )

    def pool_saturated(self, candidates: list[Endpoint]) -> bool:
        now = clock.now()
        return all(self.endpoint_saturated(ep, now) for ep in candidates)
