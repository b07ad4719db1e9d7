"""`latencyPriors:` in EndpointPickerConfig: what one pod of the pool does before the EPP
has measured it.

The latency model starts from priors for an 8B model on one H100 and learns each pod's
speed from the engine's own token-latency histogram; until the first reading (the first
second or so after the EPP starts, when a burst may already be placed) and for prefill
pods, which never decode, the priors are all it has. Every measured speed is also read
against them: a pod decoding at twice the prior's ms per token is taken to prefill at half
the prior's tokens per second, so the priors' prefill/decode ratio stays in use for the
EPP's whole life. A pool of bigger models or other GPUs sets them here:

    latencyPriors:
      prefillTokensPerSecond: 4000   # one request's prompt, uncached, alone on the pod
      decodeMsPerToken: 12           # one sequence decoding alone
      decodeMsPerSequence: 0.15      # added per token for every other sequence in the batch
      ttftBaseMs: 30                 # a first token's fixed cost (scheduling, one step)

Omitted fields keep the defaults; unknown fields and non-positive speeds are config errors.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from epp.scheduling.latency_model import LatencyPriors

_DEFAULT = LatencyPriors()


class LatencyPriorsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prefillTokensPerSecond: float = Field(1000.0 / _DEFAULT.prefill_ms_per_token, gt=0)
    decodeMsPerToken: float = Field(_DEFAULT.tpot_ms, gt=0)
    decodeMsPerSequence: float = Field(_DEFAULT.tpot_per_seq_ms, ge=0)
    ttftBaseMs: float = Field(_DEFAULT.ttft_base_ms, ge=0)

    def priors(self) -> LatencyPriors:
        return LatencyPriors(
            ttft_base_ms=self.ttftBaseMs,
            prefill_ms_per_token=1000.0 / self.prefillTokensPerSecond,
            tpot_ms=self.decodeMsPerToken,
            tpot_per_seq_ms=self.decodeMsPerSequence,
        )
