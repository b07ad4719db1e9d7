"""Keeps the approximate prefix index honest with the engines' KV-cache events.

The index guesses what each pod caches from what the EPP sent it. When a pod's engine says
its cache is gone (`AllBlocksCleared`: a reset or a restart; or its event publisher
restarted), the guesses for that pod are dropped, so requests stop being steered to a cache
that no longer exists. Block-level events are not mapped: engine block hashes are over
token ids of the engine's tokenizer, which the EPP does not run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from epp.datalayer.kv_events import AllBlocksCleared, KVEvent
from epp.scheduling.prefix_index import PrefixIndex

log = logging.getLogger(__name__)


class PrefixIndexKVSync:
    def __init__(self, index: PrefixIndex, on_reset: Callable[[str], None] | None = None) -> None:
        self.index = index
        self.on_reset = on_reset
        self.resets = 0

    def on_event(self, endpoint_key: str, event: KVEvent) -> None:
        if isinstance(event, AllBlocksCleared):
            self._reset(endpoint_key, "AllBlocksCleared")

    def on_gap(self, endpoint_key: str, missed: int) -> None:
        if missed < 0:  # the publisher restarted: so did the engine and its cache
            self._reset(endpoint_key, "publisher restart")

    def _reset(self, endpoint_key: str, why: str) -> None:
        self.index.remove_endpoint(endpoint_key)
        self.resets += 1
        if self.on_reset is not None:
            self.on_reset(endpoint_key)
        log.info("prefix index cleared for %s (%s)", endpoint_key, why)
