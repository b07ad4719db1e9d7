"""Paged KV cache with prefix caching: a block pool, a hash -> block map, LRU free list.

Mirrors vLLM V1's design: a block whose reference count drops to zero goes to the tail of
the free queue but keeps its hash, so a later request with the same prefix can revive it;
allocation takes from the head (least recently freed) and evicts that block's hash.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import xxhash

ROOT_HASH = 0


def chain_hash(parent: int, token_ids: Sequence[int]) -> int:
    """Hash of one full block given its parent's hash (64-bit, deterministic)."""
    data = struct.pack(f"<Q{len(token_ids)}I", parent, *token_ids)
    return int(xxhash.xxh64_intdigest(data))


class Block:
    __slots__ = ("block_hash", "block_id", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None


class BlockPool:
    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool = True,
        record_events: bool = True,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self._blocks)
        self._cached: dict[int, Block] = {}
        self.evictions = 0  # cached blocks dropped to make room
        # vLLM-format KV events waiting to be published: tagged arrays (only recorded when
        # someone publishes them: building them costs as much as the rest of a commit).
        self.record_events = record_events
        self.events: list[list[Any]] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def lookup_prefix(self, hashes: Sequence[int]) -> list[Block]:
        """Longest run of cached blocks matching `hashes` from the start."""
        if not self.enable_caching:
            return []
        hit: list[Block] = []
        for h in hashes:
            b = self._cached.get(h)
            if b is None:
                break
            hit.append(b)
        return hit

    def touch(self, blocks: Sequence[Block]) -> None:
        for b in blocks:
            if b.ref_cnt == 0:
                del self._free[b.block_id]
            b.ref_cnt += 1

    def allocate(self, n: int) -> list[Block] | None:
        if n > len(self._free):
            return None
        out = []
        for _ in range(n):
            _, b = self._free.popitem(last=False)
            if b.block_hash is not None:
                self._evict(b)
            b.ref_cnt = 1
            out.append(b)
        return out

    def _evict(self, b: Block) -> None:
        h = b.block_hash
        b.block_hash = None
        if h is not None and self._cached.get(h) is b:
            del self._cached[h]
            self.evictions += 1
            if self.record_events:
                self.events.append(["BlockRemoved", [h], None])

    def commit(
        self, b: Block, block_hash: int, parent: int | None, token_ids: list[int] | None
    ) -> None:
        """Mark a full block as holding `token_ids` (its chained hash) for reuse
        (`token_ids` only matter to the KV events; None when they are not recorded)."""
        if not self.enable_caching or b.block_hash is not None:
            return
        if block_hash in self._cached:  # computed concurrently by another request
            return
        b.block_hash = block_hash
        self._cached[block_hash] = b
        if self.record_events:
            self.events.append(
                ["BlockStored", [block_hash], parent, token_ids, self.block_size, None, None]
            )

    def free(self, blocks: Sequence[Block]) -> None:
        """Release a request's blocks; tail blocks first so they are evicted first."""
        for b in reversed(blocks):
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self._free[b.block_id] = b

    def reset(self) -> None:
        """Drop every cached block (only sound when no request holds blocks)."""
        for b in self._blocks:
            b.block_hash = None
        self._cached.clear()
        if self.record_events:
            self.events.append(["AllBlocksCleared"])
