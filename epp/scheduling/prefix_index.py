"""Approximate prefix-cache index: which endpoint probably holds which prompt blocks.

A prompt is cut into blocks of `block_bytes` UTF-8 bytes (≈ `block_bytes / 4` tokens) and
hashed as a chain (each block's hash seeds the next), so a block hash identifies the whole
prefix up to and including that block. Each endpoint has an LRU of the block hashes it was
sent, sized from the engine's reported KV capacity. Blocks are inserted last-to-first so
that, like the engines, the tail of a prefix is evicted before its head.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import xxhash

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.request import CHARS_PER_TOKEN, InferenceRequest

_hash = xxhash.xxh3_64_intdigest


@dataclass(slots=True)
class PrefixMatch:
    hashes: list[int]
    matched_blocks: dict[str, int]  # endpoint key -> blocks of the prompt it holds

    def matched_tokens(self, key: str, block_tokens: int) -> int:
        return self.matched_blocks.get(key, 0) * block_tokens


class PrefixIndex:
    def __init__(
        self,
        block_bytes: int = 256,
        max_blocks: int = 4096,
        default_capacity_blocks: int = 31250,
    ) -> None:
        self.block_bytes = block_bytes
        self.block_tokens = max(1, block_bytes // CHARS_PER_TOKEN)
        self.max_blocks = max_blocks
        self.default_capacity_blocks = default_capacity_blocks
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._holders: dict[int, set[str]] = {}
        self._pending: list[tuple[Endpoint, list[int]]] = []  # see `insert_soon`
        # P/D: per decode endpoint, the first block of each prompt whose KV is still being
        # prefilled elsewhere and transferred (block hash -> transfers under way). Hashes
        # are chained, so every later block of such a prompt is on its way too.
        self._in_transit: dict[str, dict[int, int]] = {}
        self._peer_transit: dict[str, dict[int, int]] = {}  # the same, of other replicas
        # Told (endpoint, first block, transfers now) when this instance's change.
        self.on_transit: Callable[[str, int, int], None] | None = None

    # ---- hashing --------------------------------------------------------------------------
    def hash_prompt(self, model: str, prompt: bytes) -> list[int]:
        """Chained hashes of the prompt's full blocks (a partial last block is not cached)."""
        bc = self.block_bytes
        n = min(len(prompt) // bc, self.max_blocks)
        h = _hash(model.encode())
        out: list[int] = []
        append = out.append
        for start in range(0, n * bc, bc):  # (slices of bytes: cheaper than a memoryview's)
            h = _hash(prompt[start : start + bc], h)
            append(h)
        return out

    def hash_request(self, request: InferenceRequest) -> list[int]:
        """`hash_prompt` of the request's routed model and prompt, computed once per request."""
        hashes = request.block_hashes
        if hashes is None:
            hashes = request.block_hashes = self.hash_prompt(request.routed_model, request.prompt)
        return hashes

    # ---- lookup ---------------------------------------------------------------------------
    def match(self, hashes: list[int]) -> dict[str, int]:
        """Longest run of leading blocks each endpoint holds."""
        if self._pending:
            self.flush()
        holders = self._holders
        if not hashes:
            return {}
        first = holders.get(hashes[0])
        if not first:
            return {}
        current = set(first)
        matched = dict.fromkeys(current, 1)
        # Each endpoint's count is written when it drops out of the run (and for those
        # still in it at the end), not at every block.
        end = len(hashes)
        for i in range(1, end):
            hs = holders.get(hashes[i])
            if not hs:
                end = i
                break
            if not current <= hs:
                for key in current - hs:
                    matched[key] = i
                current &= hs
                if not current:
                    break
        for key in current:
            matched[key] = end
        return matched

    def matched_blocks_for(self, key: str, hashes: list[int]) -> int:
        """Leading blocks of the prompt one endpoint holds (same answer as `match`).

        A linear scan: `remove_blocks` can leave holes in a held chain, which a binary
        search would jump over."""
        if self._pending:
            self.flush()
        lru = self._lru.get(key)
        if not lru:
            return 0
        n = 0
        for h in hashes:
            if h not in lru:
                break
            n += 1
        return n

    # ---- updates --------------------------------------------------------------------------
    def capacity_for(self, ep: Endpoint) -> int:
        m = ep.metrics
        if m.num_blocks > 0 and m.block_size > 0:
            return max(1, (m.num_blocks * m.block_size) // self.block_tokens)
        return self.default_capacity_blocks

    def insert_soon(self, ep: Endpoint, hashes: list[int]) -> None:
        """`insert`, applied before the index is next read and, under a running event loop,
        right after the current callback: the request just picked does not wait for its
        insert (1,500 blocks for a 100k-token prompt) before its answer goes out."""
        if not hashes:
            return
        pending = self._pending
        pending.append((ep, hashes))
        if len(pending) == 1:
            # no loop (the benchmark, vsim): the next read applies it
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Apply the inserts `insert_soon` left pending, in order."""
        pending = self._pending
        if pending:
            self._pending = []
            for ep, hashes in pending:
                self._insert(ep, hashes)

    def insert(self, ep: Endpoint, hashes: list[int]) -> None:
        if self._pending:
            self.flush()
        self._insert(ep, hashes)

    def _insert(self, ep: Endpoint, hashes: list[int]) -> None:
        if not hashes:
            return
        key = ep.key
        lru = self._lru.get(key)
        if lru is None:
            lru = self._lru[key] = OrderedDict()
        holders = self._holders
        # In C loops where possible (a 100k-token prompt is 1,500 blocks): add the blocks
        # not held yet, then move every block to the end in reverse, which leaves the same
        # order as inserting last-to-first one by one.
        new = [h for h in hashes if h not in lru]
        if new:
            lru.update(dict.fromkeys(new))
            get = holders.get
            for h in new:
                hs = get(h)
                if hs is None:
                    holders[h] = {key}
                else:
                    hs.add(key)
        deque(map(lru.move_to_end, reversed(hashes)), maxlen=0)
        cap = self.capacity_for(ep)
        popitem = lru.popitem
        while len(lru) > cap:  # the hot loop when a long new prompt fills a full LRU
            old, _ = popitem(last=False)
            hs = holders.get(old)
            if hs is not None:
                hs.discard(key)
                if not hs:
                    del holders[old]

    def remove_blocks(self, key: str, hashes: list[int]) -> None:
        self.flush()
        lru = self._lru.get(key)
        if lru is None:
            return
        for h in hashes:
            if lru.pop(h, 0) is None:
                self._drop_holder(h, key)

    # ---- KV in transit (P/D) --------------------------------------------------------------
    def begin_transfer(self, ep: Endpoint, hashes: list[int]) -> int | None:
        """A prefill endpoint computes the prompt for `ep`, which gets the KV when it is
        done: from the first block `ep` does not hold yet on, the prompt is in transit
        until `end_transfer`. Call before inserting the prompt for `ep`; returns that
        block (None: `ep` holds the whole prompt)."""
        n = self.matched_blocks_for(ep.key, hashes)
        if n >= len(hashes):
            return None
        first = hashes[n]
        n = self._count_transit(self._in_transit, ep.key, first, 1)
        if self.on_transit is not None:
            self.on_transit(ep.key, first, n)
        return first

    def end_transfer(self, key: str, first: int) -> None:
        counts = self._in_transit.get(key)
        if counts is None or first not in counts:
            return
        n = self._count_transit(self._in_transit, key, first, -1)
        if self.on_transit is not None:
            self.on_transit(key, first, n)

    def peer_transfers(self, key: str, first: int, delta: int) -> None:
        """Other EPP instances' transfers to `key` from block `first` (replica sync)."""
        self._count_transit(self._peer_transit, key, first, delta)

    @staticmethod
    def _count_transit(table: dict[str, dict[int, int]], key: str, first: int, d: int) -> int:
        counts = table.setdefault(key, {})
        n = counts.get(first, 0) + d
        if n > 0:
            counts[first] = n
        else:
            counts.pop(first, None)
            if not counts:
                del table[key]
        return max(0, n)

    def landed_blocks(self, key: str, hashes: list[int], matched: int) -> int:
        """Of the `matched` leading blocks counted on `key`, how many it really holds now:
        up to the first one still in transit (sent by this instance or a peer)."""
        counts = self._in_transit.get(key)
        peers = self._peer_transit.get(key)
        if not counts and not peers:
            return matched
        for i in range(matched):
            h = hashes[i]
            if (counts and h in counts) or (peers and h in peers):
                return i
        return matched

    def remove_endpoint(self, key: str) -> None:
        self.flush()
        self._in_transit.pop(key, None)
        self._peer_transit.pop(key, None)
        lru = self._lru.pop(key, None)
        if lru:
            for h in lru:
                self._drop_holder(h, key)

    def _drop_holder(self, h: int, key: str) -> None:
        hs = self._holders.get(h)
        if hs is not None:
            hs.discard(key)
            if not hs:
                del self._holders[h]

    def blocks_held(self, key: str) -> int:
        if self._pending:
            self.flush()
        lru = self._lru.get(key)
        return len(lru) if lru else 0

    def export(self) -> Iterator[tuple[str, list[int]]]:
        """Each endpoint's held blocks, most recently used first: `insert(ep, blocks)` of
        them (oldest chunk first) rebuilds the same LRU order elsewhere (replica sync)."""
        self.flush()
        for key, lru in list(self._lru.items()):
            yield key, list(reversed(lru))
