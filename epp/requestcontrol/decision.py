"""What request control decided for one request, and the state its lifecycle carries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.framework import SchedulingResult
from epp.scheduling.request import InferenceRequest


@dataclass(slots=True)
class Admitted:
    request: InferenceRequest
    candidates: list[Endpoint]
    rewritten_model: str | None


@dataclass(slots=True)
class Decision:
    request: InferenceRequest
    result: SchedulingResult
    rewritten_model: str | None  # set when the body's model must be replaced
    started: float  # monotonic, at pick time
    first_byte_at: float = 0.0
    prefill_settled: bool = False
    released: bool = False
    # Position of the request's prefill in its endpoint's queue (PrefillQueue.charged_total
    # right after it was charged), for the in-flight accounting's first-token correction.
    queue_position: float = 0.0
    deferred_at: float = 0.0  # when the release was deferred past the stream's end (0 = not)
    # From the gateway's response headers (0 / "" when it does not say): how many upstream
    # attempts it made and which `ip:port` answered (`x-gateway-destination-endpoint-served`).
    attempts: int = 0
    served: str = ""
    # Scratch space for lifecycle hooks that need per-request state (keyed by hook name).
    hook_state: dict[str, Any] | None = None
    # The lifecycle hooks this request started with (a `HookSet`; survives config reloads).
    hook_set: Any = None
    queue_wait_s: float = 0.0  # time spent in the flow-control queue before the pick

    @property
    def target(self) -> Endpoint:
        return self.result.target

    @property
    def charged_tokens(self) -> int:
        """Tokens charged to the target's in-flight load (prompt + expected decode)."""
        return self.request.prompt_tokens + self.request.expected_decode_tokens
