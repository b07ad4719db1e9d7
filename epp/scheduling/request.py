"""The request as the scheduler sees it: parsed once, never re-parsed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Chars per token used to estimate token counts without a tokenizer (English text ≈ 4).
CHARS_PER_TOKEN = 4


@dataclass(slots=True)
class InferenceRequest:
    request_id: str
    model: str  # the model the client named
    target_model: str = ""  # after an InferenceModel / header rewrite; "" = same as model
    api: str = "completions"  # completions | chat | embeddings | responses | other
    prompt: bytes = b""  # prompt in a prefix-stable UTF-8 serialisation (for hashing)
    prompt_tokens: int = 0  # estimate
    max_tokens: int = 0  # requested decode tokens (0 = unknown)
    stream: bool = False
    business: str | None = None
    priority: int = 0  # < 0 = sheddable
    objective: str | None = None  # the InferenceObjective that set `priority`, if any
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    session_key: str | None = None
    subset: frozenset[str] | None = None  # proxy's subset hint, None = no hint
    headers: dict[str, str] = field(default_factory=dict)
    # The parsed JSON body (not copied), for plugins that tokenize the prompt like the engine.
    body: dict[str, Any] | None = None
    # The prompt's approximate block hashes, once computed (`PrefixIndex.hash_request`): flow
    # control's work estimate and every scheduling cycle of the request share them.
    block_hashes: list[int] | None = None
    # Flow control found the request's tenant taking more than its share of the pool lately:
    # its prompts are not spread over other pods to spare its own queued first tokens.
    over_share: bool = False

    @property
    def routed_model(self) -> str:
        return self.target_model or self.model

    @property
    def expected_decode_tokens(self) -> int:
        return self.max_tokens if self.max_tokens > 0 else 256


class CycleState:
    """Per-request scratch space shared by the plugins of one scheduling cycle."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        return self._data.get(key)

    def set(self, key: str, value: Any) -> None:
        self._data[key] = value
