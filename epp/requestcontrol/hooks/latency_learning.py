"""Latency learning: fits each endpoint's latency model from what the EPP observes.

TTFT is learned only from a true first token (a stream's first chunk), against the prefill
work that was queued ahead of the request at pick time plus its own uncached tokens; TPOT
from the end of a response and its `usage`; the typical uncached size of a request from
what is sent.
"""

from __future__ import annotations

from typing import ClassVar

from epp.requestcontrol.decision import Decision
from epp.requestcontrol.lifecycle import LifecycleHook
from epp.scheduling.framework import PREDICTIONS


class LatencyLearning(LifecycleHook):
    type_name = "latency-learning"
    consumes: ClassVar[frozenset[str]] = frozenset({PREDICTIONS})

    def pre_request(self, d: Decision) -> None:
        res = d.result
        self.services.latency.observe_sent(res.prefill or res.target, res.uncached_tokens)

    def first_token(self, d: Decision, now: float, learn: bool) -> None:
        if not learn:
            return
        res = d.result
        ttft_ms = (now - d.started) * 1000.0
        self.services.latency.observe_ttft(
            res.prefill or res.target, ttft_ms, res.uncached_tokens + res.queued_prefill_tokens
        )

    def complete(self, d: Decision, output_tokens: int, now: float) -> None:
        if not d.first_byte_at or output_tokens < 2:
            return
        tpot_ms = (now - d.first_byte_at) * 1000.0 / (output_tokens - 1)
        model = self.services.latency
        model.observe_tpot(d.target, tpot_ms, model.batch_size(d.target))
