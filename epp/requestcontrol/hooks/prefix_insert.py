"""Approximate prefix index upkeep: the endpoints a prompt was sent to now probably cache it.

Inserted at pick time (not at response end) so the next request of the same group, even in
the same burst, follows the first one: `insert_soon` applies it before the index is read
again, and otherwise right after the answer has gone to the gateway. With P/D both hops hold
the prompt's KV afterwards.
"""

from __future__ import annotations

from typing import ClassVar

from epp.requestcontrol.decision import Decision
from epp.requestcontrol.lifecycle import LifecycleHook
from epp.scheduling.framework import PREFIX_HASHES


class PrefixCacheInsert(LifecycleHook):
    type_name = "prefix-cache-insert"
    consumes: ClassVar[frozenset[str]] = frozenset({PREFIX_HASHES})

    def pre_request(self, d: Decision) -> None:
        res = d.result
        index = self.services.prefix_index
        if res.prefill is not None:
            index.insert_soon(res.prefill, res.prefix_hashes)
        index.insert_soon(res.target, res.prefix_hashes)
