"""Saturation detector: has an endpoint room for one more request right now?

An endpoint is full when any configured signal reaches its threshold:

* `maxConcurrency` / `maxTokenConcurrency`: requests / tokens the EPP itself has in flight
  there (charged at pick time, so a burst sees its own earlier picks; 0 = off);
* `queueDepthThreshold`: requests waiting for their first token — the larger of the engine's
  scraped queue (fresh metrics only) and the EPP's own count of sent-but-no-first-token;
* `kvCacheUtilThreshold`: the engine's KV-cache use (fresh metrics only);
* `maxQueuedPrefillTokens`: prefill work queued there as the latency model sees it;
* `maxPredictedTTFT`: the latency model's predicted wait before a new request's prefill.

Metrics older than `metricsStalenessThreshold` are treated as absent (the EPP's own signals
still apply), not as saturation. The pool is saturated for a request when none of its
candidates has room. Parameter names follow the ecosystem's `utilization-detector` and
`concurrency-detector`; both type names are accepted, with their defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from epp import clock as epp_clock
from epp.datalayer.endpoint import Endpoint
from epp.scheduling.latency_model import LatencyModel

DETECTOR_TYPES = frozenset({"saturation-detector", "utilization-detector", "concurrency-detector"})

_KNOWN = {
    "queueDepthThreshold",
    "kvCacheUtilThreshold",
    "metricsStalenessThreshold",
    "maxConcurrency",
    "maxTokenConcurrency",
    "concurrencyMode",
    "maxQueuedPrefillTokens",
    "maxPredictedTTFT",
}


def _seconds(value: Any, name: str) -> float:
    # local import: config.py imports this module
    from epp.requestcontrol.flowcontrol.config import duration

    return duration(value, name)


class SaturationDetector:
    def __init__(
        self,
        type_name: str = "saturation-detector",
        params: Mapping[str, Any] | None = None,
        latency: LatencyModel | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if type_name not in DETECTOR_TYPES:
            raise ValueError(f"unknown saturation detector type {type_name!r}")
        p = dict(params or {})
        unknown = set(p) - _KNOWN
        if unknown:
            raise ValueError(
                f"{type_name}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(_KNOWN))}"
            )
        concurrency_only = type_name == "concurrency-detector"
        self.type_name = type_name
        self.latency = latency or LatencyModel()
        self.clock = clock or (lambda: epp_clock.now())
        self.queue_depth = float(p.get("queueDepthThreshold", 0 if concurrency_only else 5))
        self.kv_util = float(p.get("kvCacheUtilThreshold", 0 if concurrency_only else 0.8))
        self.stale_after = _seconds(p.get("metricsStalenessThreshold", 0.2), "staleness")
        mode = str(p.get("concurrencyMode", "requests"))
        if mode not in ("requests", "tokens", "hybrid"):
            raise ValueError("concurrencyMode must be requests, tokens or hybrid")
        max_conc = int(p.get("maxConcurrency", 100 if concurrency_only else 0))
        max_tokens = int(p.get("maxTokenConcurrency", 1_000_000 if concurrency_only else 0))
        self.max_concurrency = max_conc if mode in ("requests", "hybrid") else 0
        self.max_tokens = max_tokens if mode in ("tokens", "hybrid") or not concurrency_only else 0
        self.max_queued_tokens = int(p.get("maxQueuedPrefillTokens", 0))
        self.max_ttft_ms = 1000.0 * _seconds(p.get("maxPredictedTTFT", 0), "maxPredictedTTFT")
        for name, v in (
            ("queueDepthThreshold", self.queue_depth),
            ("kvCacheUtilThreshold", self.kv_util),
            ("maxConcurrency", self.max_concurrency),
            ("maxTokenConcurrency", self.max_tokens),
            ("maxQueuedPrefillTokens", self.max_queued_tokens),
        ):
            if v < 0:
                raise ValueError(f"{name} must not be negative")
        if self.kv_util > 1:
            raise ValueError("kvCacheUtilThreshold is a fraction in (0, 1]")

    def has_room(self, ep: Endpoint, now: float) -> bool:
        inf = ep.inflight
        if self.max_concurrency and inf.requests + inf.prefill_requests >= self.max_concurrency:
            return False
        if self.max_tokens and inf.tokens + inf.prefill_tokens >= self.max_tokens:
            return False
        if self.queue_depth or self.kv_util:
            m = ep.metrics
            fresh = m.updated_at > 0.0 and now - m.updated_at <= self.stale_after
            if self.queue_depth:
                waiting = max(m.waiting, inf.pending_requests) if fresh else inf.pending_requests
                if waiting >= self.queue_depth:
                    return False
            if self.kv_util and fresh and m.kv_usage >= self.kv_util:
                return False
        if self.max_queued_tokens or self.max_ttft_ms:
            queued = self.latency.queued_prefill_tokens(ep)
            if self.max_queued_tokens and queued >= self.max_queued_tokens:
                return False
            if self.max_ttft_ms and self.latency.predict_ttft_ms(ep, 0) >= self.max_ttft_ms:
                return False
        return True

    def available(self, candidates: Sequence[Endpoint], now: float | None = None) -> list[Endpoint]:
        """The candidates with room for one more request (empty = saturated)."""
        t = self.clock() if now is None else now
        has_room = self.has_room
        return [ep for ep in candidates if has_room(ep, t)]

    def saturated(self, candidates: Sequence[Endpoint], now: float | None = None) -> bool:
        t = self.clock() if now is None else now
        return not any(self.has_room(ep, t) for ep in candidates)
