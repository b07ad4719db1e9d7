"""Per-endpoint latency model: predicted TTFT and TPOT, learned online.

TTFT ≈ base + rate × (uncached prompt tokens of this request + prefill work already queued
on the endpoint). TPOT ≈ base + per_seq × decode batch size. The per-endpoint coefficients
live on `Endpoint.latency` and are fitted by EWMA from what the EPP observes (first byte,
end of stream, usage). Priors are an 8B model on one H100; they are replaced by
observations after a few requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from epp.datalayer.endpoint import Endpoint

PICK_RATE_TAU_S = 5.0  # time constant of the per-endpoint pick-rate estimate


@dataclass(slots=True)
class LatencyPriors:
    ttft_base_ms: float = 30.0
    prefill_ms_per_token: float = 0.25
    tpot_ms: float = 12.0
    tpot_per_seq_ms: float = 0.15
    unknown_queue_tokens: int = 512  # prompt tokens assumed per request we did not send


class LatencyModel:
    """`priors` start as the static defaults and then follow the fleet: every observation
    also moves them, so an endpoint with no observations of its own is predicted like the
    average endpoint, not like an H100 (which would bias picks toward observed endpoints)."""

    def __init__(self, priors: LatencyPriors | None = None, alpha: float = 0.2) -> None:
        self.priors = priors or LatencyPriors()
        self.alpha = alpha
        self.fleet_alpha = alpha / 4

    # ---- prediction (hot path) ------------------------------------------------------------
    def queued_prefill_tokens(self, ep: Endpoint) -> int:
        inf = ep.inflight
        queued = inf.pending_prefill_tokens + inf.prefill_tokens
        extra = ep.metrics.waiting - inf.pending_requests
        if extra > 0:  # waiting requests the engine reports beyond those we count
            per = ep.latency.uncached_tokens or self.priors.unknown_queue_tokens
            queued += int(extra * per)
        return queued

    def predict_ttft_ms(
        self, ep: Endpoint, uncached_tokens: int, queued_tokens: int | None = None
    ) -> float:
        lat = ep.latency
        rate = lat.prefill_ms_per_token or self.priors.prefill_ms_per_token
        base = lat.ttft_base_ms or self.priors.ttft_base_ms
        if queued_tokens is None:
            queued_tokens = self.queued_prefill_tokens(ep)
        return base + rate * (uncached_tokens + queued_tokens)

    def batch_size(self, ep: Endpoint) -> float:
        return max(float(ep.inflight.requests), ep.metrics.running)

    def predict_tpot_ms(self, ep: Endpoint, extra_seqs: int = 1) -> float:
        lat = ep.latency
        scraped = ep.metrics.tpot_recent_ms
        if not lat.tpot_ms and scraped > 0:  # the engine's own recent TPOT, one more seq
            return scraped + (lat.tpot_per_seq_ms or self.priors.tpot_per_seq_ms) * extra_seqs
        base = lat.tpot_ms or self.priors.tpot_ms
        per_seq = lat.tpot_per_seq_ms or self.priors.tpot_per_seq_ms
        return base + per_seq * (self.batch_size(ep) + extra_seqs)

    # ---- prefill queue, fluid model ------------------------------------------------------------
    def prefill_tokens_per_s(self, ep: Endpoint, slow: float = 1.0) -> float:
        rate_ms = ep.latency.prefill_ms_per_token or self.priors.prefill_ms_per_token
        return 1000.0 / (rate_ms * slow)

    def backlog_tokens(self, ep: Endpoint, now: float, tokens_per_s: float) -> float:
        """Uncached prompt tokens sent to `ep` and probably not prefilled yet at `now`."""
        inf = ep.queue
        b = inf.backlog_tokens
        if b <= 0.0:
            return 0.0
        b -= tokens_per_s * (now - inf.backlog_at)
        return b if b > 0.0 else 0.0

    def charge_backlog(self, ep: Endpoint, tokens: int, now: float) -> None:
        inf = ep.queue
        inf.backlog_tokens = self.backlog_tokens(ep, now, self.prefill_tokens_per_s(ep)) + tokens
        inf.backlog_at = now
        inf.charged_total += tokens
        inf.pick_rate = self.pick_rate(ep, now) + 1.0 / PICK_RATE_TAU_S
        inf.last_pick_at = now

    def settle_backlog(self, ep: Endpoint, position: float, now: float) -> None:
        """A request queued at `position` (charged_total right after its charge) has its
        first token: everything charged before it is prefilled too."""
        inf = ep.queue
        ahead_of_now = inf.charged_total - position
        current = self.backlog_tokens(ep, now, self.prefill_tokens_per_s(ep))
        inf.backlog_tokens = min(current, max(0.0, ahead_of_now))
        inf.backlog_at = now

    def pick_rate(self, ep: Endpoint, now: float) -> float:
        """Requests per second recently sent to `ep` (exponentially decaying average)."""
        inf = ep.queue
        if inf.pick_rate <= 0.0:
            return 0.0
        return inf.pick_rate * math.exp(-(now - inf.last_pick_at) / PICK_RATE_TAU_S)

    # ---- learning ----------------------------------------------------------------------------
    def observe_sent(self, ep: Endpoint, uncached_tokens: int) -> None:
        lat = ep.latency
        if lat.uncached_tokens == 0:
            lat.uncached_tokens = float(uncached_tokens)
        else:
            lat.uncached_tokens += self.alpha * (uncached_tokens - lat.uncached_tokens)

    def observe_ttft(self, ep: Endpoint, ttft_ms: float, prefill_tokens: int) -> None:
        """`prefill_tokens`: this request's uncached tokens plus the work queued ahead of it."""
        lat = ep.latency
        a = self.alpha
        base = lat.ttft_base_ms or self.priors.ttft_base_ms
        pr = self.priors
        fa = self.fleet_alpha
        if prefill_tokens >= 256:
            rate = max(1e-4, (ttft_ms - base) / prefill_tokens)
            cur = lat.prefill_ms_per_token or pr.prefill_ms_per_token
            lat.prefill_ms_per_token = cur + a * (rate - cur)
            pr.prefill_ms_per_token += fa * (rate - pr.prefill_ms_per_token)
        else:
            rate = lat.prefill_ms_per_token or pr.prefill_ms_per_token
            sample = max(0.1, ttft_ms - rate * prefill_tokens)
            lat.ttft_base_ms = base + a * (sample - base)
            pr.ttft_base_ms += fa * (sample - pr.ttft_base_ms)
        lat.samples += 1

    def observe_tpot(self, ep: Endpoint, tpot_ms: float, batch: float) -> None:
        lat = ep.latency
        per_seq = lat.tpot_per_seq_ms or self.priors.tpot_per_seq_ms
        base = lat.tpot_ms or self.priors.tpot_ms
        sample = max(0.05, tpot_ms - per_seq * batch)
        lat.tpot_ms = base + self.alpha * (sample - base)
        self.priors.tpot_ms += self.fleet_alpha * (sample - self.priors.tpot_ms)
