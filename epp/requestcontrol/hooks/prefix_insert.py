"""Approximate prefix index upkeep: the endpoints a prompt was sent to now probably cache it.

Inserted at pick time (not at response end) so the next request of the same group, even in
the same burst, follows the first one: `insert_soon` applies it before the index is read
again, and otherwise right after the answer has gone to the gateway. With P/D both hops hold
the prompt's KV afterwards, the decode endpoint only once the prefill is done and the KV
transferred (its answer's headers, or the first token): until then its new blocks are
marked in transit (`begin_transfer`). A request that counted on them there would prefill
the whole prompt again on the decode pod, in front of the decodes waiting for their KV
(bench/RESULTS.md §0, P/D).
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
            first = index.begin_transfer(res.target, res.prefix_hashes)
            if first is not None:
                if d.hook_state is None:
                    d.hook_state = {}
                d.hook_state[self.name] = first
            index.insert_soon(res.prefill, res.prefix_hashes)
        index.insert_soon(res.target, res.prefix_hashes)

    def response_headers(self, d: Decision, status: int) -> None:
        # The P/D sidecar forwards to the decode engine only once the remote prefill is
        # done, so the decode pod's answer means the KV is there (or never will be).
        self._landed(d)

    def prefill_done(self, d: Decision) -> None:
        self._landed(d)

    def _landed(self, d: Decision) -> None:
        first = d.hook_state.pop(self.name, None) if d.hook_state else None
        if first is not None:
            self.services.prefix_index.end_transfer(d.result.target.key, first)
