"""Precise prefix-cache affinity: what each pod's engine really holds, from its KV events.

The prompt is tokenized with the model's own tokenizer and chat template (`--tokenizer-dir`)
and hashed in blocks of the engine's block size; the precise index (fed by the engines'
`BlockStored` / `BlockRemoved` / `AllBlocksCleared` events) says how many leading blocks each
pod holds. Pods whose event stream the EPP cannot vouch for use the approximate index.
Score: like `prefix-cache-scorer`, a blend of the cached share of the prompt and the cached
tokens relative to the best pod (`absoluteWeight`, default 0.5).

Parameters, in the ecosystem's shape (llm-d's `precise-prefix-cache-scorer`):

    tokenProcessorConfig: {blockSize: 64, hashSeed: "42"}  # also under indexerConfig
    kvEventsConfig: {zmqEndpoint: "tcp://*:5557", topicFilter: "kv@"}
    indexerConfig: {speculativeIndexing: true, ...}

`blockSize` must match the engines' `--block-size` (default 16). `hashSeed` is accepted and
only seeds the EPP's own hashes: the index keys blocks by their token ids, so the engines'
PYTHONHASHSEED does not matter here. `zmqEndpoint`: bind a SUB socket the engines publish to
(vLLM `--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": "tcp://<epp>:5557", "topic": "kv@<pod-ip>:<port>@<model>"}'`);
`kvEventsConfig.podDiscoveryConfig.socketPort` (or `--kv-events-port`): connect to every
endpoint's own publisher instead. llm-d's tokenizer-pool, prefix-store and block-index
settings are accepted and not used (the EPP tokenizes in-process, from local files). Our
own: `absoluteWeight`, `speculativeTTLSeconds` (default 10: how long blocks just sent to a
pod count as held before its events confirm them), `speculativeEviction` (default true: the
blocks a pod's cache cannot keep besides those just sent, least recent first, stop counting
as held until its events confirm the eviction or the TTL passes). Anything else is a
configuration error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.framework import SchedulingResult, Scorer
from epp.scheduling.plugins.common import (
    PRECISE_MATCH_KEY,
    TOKENS_KEY,
    PromptTokens,
    cached_tokens,
)
from epp.scheduling.precise_index import PreciseIndex
from epp.scheduling.request import CycleState, InferenceRequest

log = logging.getLogger(__name__)

_STRICT = ConfigDict(extra="forbid")


class _TokenProcessor(BaseModel):
    model_config = _STRICT
    blockSize: int | None = Field(default=None, ge=1)
    hashSeed: str | int | None = None


class _PodDiscovery(BaseModel):
    model_config = _STRICT
    socketPort: int | None = Field(default=None, ge=1, le=65535)


class _KVEvents(BaseModel):
    model_config = _STRICT
    zmqEndpoint: str | None = None
    topicFilter: str | None = None
    concurrency: int | None = None  # accepted: events are applied in order in the event loop
    discoverPods: bool | None = None
    podDiscoveryConfig: _PodDiscovery | None = None


class _Indexer(BaseModel):
    model_config = _STRICT
    tokenProcessorConfig: _TokenProcessor | None = None
    speculativeIndexing: bool | None = None
    # llm-d's own tokenizer pool, prefix store and block index: accepted, not used here.
    tokenizersPoolConfig: dict[str, Any] | None = None
    prefixStoreConfig: dict[str, Any] | None = None
    kvBlockIndexConfig: dict[str, Any] | None = None
    kvCacheBackendConfigs: list[Any] | dict[str, Any] | None = None


class PreciseParams(BaseModel):
    model_config = _STRICT
    tokenProcessorConfig: _TokenProcessor | None = None
    indexerConfig: _Indexer | None = None
    kvEventsConfig: _KVEvents | None = None
    absoluteWeight: float = Field(default=0.5, ge=0.0, le=1.0)
    speculativeTTLSeconds: float = Field(default=10.0, ge=0.0)
    speculativeEviction: bool = True


DEFAULT_BLOCK_SIZE = 16  # vLLM's default --block-size
DEFAULT_DISCOVERY_PORT = 5557


class PrecisePrefixCacheScorer(Scorer):
    type_name = "precise-prefix-cache-scorer"

    def configure(self) -> None:
        p = PreciseParams.model_validate(dict(self.params))
        tp = p.tokenProcessorConfig
        inner = p.indexerConfig.tokenProcessorConfig if p.indexerConfig else None
        if tp is not None and inner is not None and tp != inner:
            raise ValueError("tokenProcessorConfig and indexerConfig.tokenProcessorConfig disagree")
        tp = tp or inner or _TokenProcessor()
        block_size = tp.blockSize or DEFAULT_BLOCK_SIZE
        seed = "" if tp.hashSeed is None else str(tp.hashSeed)
        speculative = not (p.indexerConfig and p.indexerConfig.speculativeIndexing is False)
        self.absolute_weight = p.absoluteWeight
        self.speculative = speculative and p.speculativeTTLSeconds > 0
        svc = self.services
        if svc.precise is None:
            svc.precise = PreciseIndex(block_size, seed, speculative_ttl_s=p.speculativeTTLSeconds)
        elif svc.precise.block_size != block_size or svc.precise.hash_seed != seed:
            raise ValueError("two precise prefix scorers with different tokenProcessorConfig")
        svc.precise.evict_speculatively = self.speculative and p.speculativeEviction
        ev = p.kvEventsConfig
        if ev is not None:
            if ev.zmqEndpoint and ev.zmqEndpoint not in svc.kv_events.bind:
                svc.kv_events.bind.append(ev.zmqEndpoint)
            if ev.topicFilter:
                svc.kv_events.topic_filter = ev.topicFilter
            port = ev.podDiscoveryConfig.socketPort if ev.podDiscoveryConfig else None
            if port or ev.discoverPods:
                svc.kv_events.connect_port = port or DEFAULT_DISCOVERY_PORT
        idx = p.indexerConfig
        if idx is not None and (idx.kvBlockIndexConfig or {}).get("redisConfig"):
            log.warning("%s: kvBlockIndexConfig.redisConfig is not used: every EPP replica "
                        "keeps its own index from the events", self.name)  # fmt: skip
        if not svc.tokenizers:
            if not svc.tokenizer_fallback:
                raise ValueError(
                    "needs the model's tokenizer: start the EPP with --tokenizer-dir DIR (a "
                    "local Hugging Face tokenizer directory; nothing is downloaded), or with "
                    "--tokenizer-fallback to use the approximate prefix index instead"
                )
            log.warning("%s: no tokenizer (--tokenizer-dir); using the approximate prefix "
                        "index", self.name)  # fmt: skip

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        cached = cached_tokens(cycle, self.services, request)
        prompt = request.prompt_tokens
        if not cached or prompt <= 0:
            return [0.0] * len(endpoints)
        matched = [cached.get(ep.key, 0) for ep in endpoints]
        best = max(matched)
        if best <= 0:
            return [0.0] * len(endpoints)
        w = self.absolute_weight
        # Most pods hold none of the prompt: 0.0, what the blend gives them (w in [0, 1]).
        return [(1 - w) * min(1.0, m / prompt) + w * m / best if m else 0.0 for m in matched]

    def on_picked(
        self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult
    ) -> None:
        precise = self.services.precise
        pt = cycle.get(TOKENS_KEY)
        if not self.speculative or precise is None or not isinstance(pt, PromptTokens):
            return
        held: dict[str, int] = cycle.get(PRECISE_MATCH_KEY) or {}
        pods = [(ep.key, held.get(ep.key, 0)) for ep in (result.target, result.prefill) if ep]

        def speculate_all() -> None:
            # Once the answer has gone out (the index's next read runs it first): the rest of
            # the prompt's tokens, its entries and the evictions they make room for.
            hashes = pt.complete(precise)
            for key, start in pods:
                precise.speculate(key, hashes, start)

        precise.speculate_soon(speculate_all)
