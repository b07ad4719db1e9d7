"""Applies the engines' KV-cache events to the EPP's prefix indexes.

- The approximate index guesses what each pod caches from what the EPP sent it. When a pod's
  engine says its cache is gone (`AllBlocksCleared`: a reset or a restart; or its event
  publisher restarted), the guesses for that pod are dropped.
- The precise index (when a `precise-prefix-cache-scorer` is configured) is built from the
  events themselves: `BlockStored` / `BlockRemoved` per block, `AllBlocksCleared`, and the
  publisher's sequence numbers, which say whether the EPP saw everything (see
  `epp.scheduling.precise_index`).

Keys: events arrive under the endpoint key `ip:port` of their topic (or connection); a topic
that names only the pod's IP (llm-d's `kv@<pod-ip>@<model>`) is resolved to the endpoint at
that address by `resolve`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from epp.datalayer.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from epp.scheduling.precise_index import PreciseIndex
from epp.scheduling.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

FULL_ATTENTION = (None, "full_attention", "full")


class PrefixIndexKVSync:
    def __init__(
        self,
        index: PrefixIndex,
        on_reset: Callable[[str], None] | None = None,
        *,
        precise: PreciseIndex | None = None,
        resolve: Callable[[str], str | None] | None = None,
    ) -> None:
        self.index = index
        self.on_reset = on_reset
        self.precise = precise
        self.resolve = resolve
        self.resets = 0
        self.unresolved = 0

    def _key(self, key: str) -> str | None:
        if self.resolve is None:
            return key
        out = self.resolve(key)
        if out is None:
            self.unresolved += 1
        return out

    def on_event(self, endpoint_key: str, event: KVEvent) -> None:
        key = self._key(endpoint_key)
        if key is None:
            return
        precise = self.precise
        if isinstance(event, BlockStored):
            if precise is not None and event.spec_kind in FULL_ATTENTION:
                precise.stored(
                    key,
                    event.block_hashes,
                    event.parent_hash,
                    event.token_ids,
                    event.block_size,
                    medium=event.medium,
                    lora=event.lora_id is not None or event.lora_name is not None,
                    salted=event.keyed_beyond_tokens,
                    group=event.group_idx,
                )
        elif isinstance(event, BlockRemoved):
            if precise is not None:
                precise.removed(key, event.block_hashes, event.medium, event.group_idx)
        elif isinstance(event, AllBlocksCleared):
            if precise is not None:
                precise.cleared(key)
            self._reset(key, "AllBlocksCleared")

    def on_gap(self, endpoint_key: str, missed: int) -> None:
        key = self._key(endpoint_key)
        if key is None:
            return
        if missed < 0:  # the publisher restarted: so did the engine and its cache
            self._reset(key, "publisher restart")
        elif self.precise is not None:
            self.precise.gap(key, missed)

    def on_disconnect(self, endpoint_key: str) -> None:
        """The publisher's connection dropped: the engine may be restarting with an empty
        cache, and its events are lost until we reconnect. Guess nothing about it until its
        stream says more."""
        key = self._key(endpoint_key)
        if key is None:
            return
        if self.precise is not None:
            self.precise.gap(key, 0)
        self._reset(key, "publisher disconnected")

    def on_stream(self, endpoint_key: str, seq: int) -> None:
        key = self._key(endpoint_key)
        if key is not None and self.precise is not None:
            self.precise.stream_started(key, seq)

    def _reset(self, endpoint_key: str, why: str) -> None:
        self.index.remove_endpoint(endpoint_key)
        self.resets += 1
        if self.on_reset is not None:
            self.on_reset(endpoint_key)
        log.info("prefix index cleared for %s (%s)", endpoint_key, why)
