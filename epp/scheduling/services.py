"""Shared state the plugins of one scheduler use: the prefix indexes, the latency model and
(for precise prefix routing) the model tokenizers and the KV-event settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from epp.scheduling.latency_model import LatencyModel
from epp.scheduling.precise_index import PreciseIndex
from epp.scheduling.prefix_index import PrefixIndex
from epp.tokenization.tokenizer import TokenizerSet


@dataclass(slots=True)
class KVEventsSettings:
    """Where the EPP receives KV events (set by the precise prefix scorer's config)."""

    bind: list[str] = field(default_factory=list)  # ZMQ addresses the publishers connect to
    connect_port: int = 0  # else: connect to every endpoint's publisher on this port
    topic_filter: str = ""


@dataclass(slots=True)
class Services:
    prefix_index: PrefixIndex = field(default_factory=PrefixIndex)
    latency: LatencyModel = field(default_factory=LatencyModel)
    # Precise prefix routing: set up by the precise-prefix-cache-scorer when configured.
    precise: PreciseIndex | None = None
    kv_events: KVEventsSettings = field(default_factory=KVEventsSettings)
    # Tokenizers from --tokenizer-dir; `tokenizer_fallback`: without one, the precise scorer
    # falls back to the approximate index instead of refusing to start.
    tokenizers: TokenizerSet | None = None
    tokenizer_fallback: bool = False
