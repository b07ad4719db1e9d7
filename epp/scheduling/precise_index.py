"""Exact prefix-cache index: which blocks each pod's engine holds, from its KV events.

Keys are the EPP's own chained hashes of token-id blocks (`block_size` tokens each): block
i's hash is xxh3-64 of its token ids (uint32 little endian) seeded with block i-1's hash, so
one hash names a whole prefix. The engines' `BlockStored` events carry the token ids, the
parent's engine hash and the block size; each pod's engine hashes map to the EPP's hashes,
so `BlockRemoved` removes exactly what the engine evicted. The EPP never needs to reproduce
the engine's hash function (nor its PYTHONHASHSEED).

A pod's view is *trusted* when the EPP has seen every event that shaped the engine's cache:
its publisher's stream from sequence 0, or since an `AllBlocksCleared` (the cache is empty
then). A late start, a sequence gap or a publisher restart past sequence 0 make it untrusted:
the view is cleared and rebuilt from new events, and the scheduler uses the approximate
index for that pod until the view is trusted again, that is after a reset or once the pod
has stored as many blocks as its cache holds without extending a prefix the EPP does not
know (so what it held before the gap is gone).

At pick time the chosen pod gets *speculative* entries for the prompt's blocks it does not
hold yet (a burst of one prefix group follows its first request); an event confirms them,
or they expire after `speculative_ttl_s`. The same pick makes the engine evict: with
`evict_speculatively`, the pod's blocks beyond its capacity, least recently stored or sent
first (the engine's own order, a prompt's tail before its head), are *doomed*: not counted
as held until `BlockRemoved` confirms it or the same expiry passes. Without this the index
learns of an eviction only from the engine's event, after the next request may already
have been sent for blocks that are gone (bench/RESULTS.md §0, "Precise prefix on
kv_pressure").

Memory per pod is bounded by the pod's KV capacity in blocks (`capacity(key)`, from the
engine's reported cache shape): past it the oldest entries are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import xxhash

log = logging.getLogger(__name__)

_hash = xxhash.xxh3_64_intdigest
EngineHash = int | bytes
DEFAULT_CAPACITY_BLOCKS = 1 << 20
GPU_MEDIA = (None, "GPU", "gpu", "cuda")


@dataclass(slots=True)
class PodView:
    key: str
    blocks: dict[int, int] = field(default_factory=dict)  # EPP hash -> engine blocks holding it
    engine: dict[EngineHash, int] = field(default_factory=dict)  # engine hash -> EPP hash
    spec: dict[int, float] = field(default_factory=dict)  # EPP hash -> expiry (monotonic)
    # Held and speculative blocks, least recently stored or sent first: the order the
    # engine evicts in (a prompt's tail before its head).
    recency: OrderedDict[int, None] = field(default_factory=OrderedDict)
    # Blocks the engine will probably evict to make room for blocks just sent to it, not
    # counted as held until its events say (BlockRemoved) or the expiry passes.
    doomed: dict[int, float] = field(default_factory=dict)  # EPP hash -> expiry (monotonic)
    trusted: bool = False
    rebuilding: bool = False  # untrusted after a gap: counting stores until the cache turned over
    stored_since_gap: int = 0
    last_orphan_at: int = 0  # stored_since_gap when a store extended an unknown prefix
    group: int | None = None  # the KV-cache group indexed (hybrid models publish several)
    stored: int = 0
    removed: int = 0
    orphans: int = 0  # stores whose parent the EPP never saw
    unknown_removals: int = 0
    skipped: int = 0  # stores for another block size, LoRA adapter, medium or salted blocks
    overflow: int = 0  # entries dropped at the capacity bound (missed removals)


class PreciseIndex:
    def __init__(
        self,
        block_size: int = 16,
        hash_seed: str = "",
        *,
        speculative_ttl_s: float = 10.0,
        capacity: Callable[[str], int] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError("block size must be >= 1")
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.root = _hash(f"epp-precise-prefix:{hash_seed}".encode())
        self.speculative_ttl_s = speculative_ttl_s
        self.capacity = capacity
        if clock is None:
            import time

            clock = time.monotonic
        self.clock = clock
        self.pods: dict[str, PodView] = {}
        self._expiries: deque[tuple[float, str, list[int]]] = deque()
        self._doom_expiries: deque[tuple[float, str, list[int]]] = deque()
        # Block hashes per tokenizer chunk (see hash_prompt), bounded in hashes held.
        self._chunk_hashes: OrderedDict[int, list[int]] = OrderedDict()
        self._chunk_hashes_size = 0
        self.chunk_cache_entries = 1_000_000
        self._warned: set[str] = set()
        self._pending: list[Callable[[], None]] = []  # see `speculate_soon`
        self.evict_speculatively = True
        # Told the blocks this instance's own picks speculate (replica sync shares them).
        self.on_speculate: Callable[[str, list[int]], None] | None = None

    # ---- hashing ------------------------------------------------------------------------------
    def hash_tokens(
        self, token_bytes: bytes | memoryview, start: int = 0, parent: int = 0
    ) -> list[int]:
        """Chained hashes of the full blocks of packed uint32 token ids, from block `start`
        on; `parent` is block start-1's hash (ignored for start 0)."""
        step = self.block_size * 4
        n = len(token_bytes) // step
        h = parent if start else self.root
        view = memoryview(token_bytes)
        out = [0] * (n - start) if n > start else []
        for i in range(start, n):
            h = _hash(view[i * step : (i + 1) * step], h)
            out[i - start] = h
        return out

    def hash_ids(self, ids: Sequence[int]) -> list[int]:
        return self.hash_tokens(array("I", ids).tobytes())

    def hash_prompt(
        self,
        ids: Sequence[int],
        marks: Sequence[tuple[int, int]] = (),
        *,
        resume: list[int] | None = None,
        first_mark: int = 0,
    ) -> list[int]:
        """Block hashes of a prompt's ids; `marks` (from the tokenizer: a key naming the
        text up to a chunk's end, and the ids up to there) let the blocks that end inside a
        chunk be reused by every later prompt that shares the text up to it. `resume`: the
        hashes already computed up to `marks[first_mark - 1]` (extended in place)."""
        bs = self.block_size
        n = len(ids) // bs
        out: list[int] = resume if resume is not None else []
        cache = self._chunk_hashes
        for key, end in marks[first_mark:] if first_mark else marks:
            got = cache.get(key)
            if got is None:
                got = self._hash_range(ids, len(out), end // bs, out[-1] if out else 0)
                cache[key] = got
                self._chunk_hashes_size += len(got) + 1
            else:
                cache.move_to_end(key)
            out += got
        if len(out) < n:
            out += self._hash_range(ids, len(out), n, out[-1] if out else 0)
        while self._chunk_hashes_size > self.chunk_cache_entries and cache:
            _, old = cache.popitem(last=False)
            self._chunk_hashes_size -= len(old) + 1
        return out

    def hash_next(self, parent: int, block: Sequence[int]) -> int:
        """The hash of one block of ids after the block hashed `parent`."""
        return _hash(array("I", block).tobytes(), parent)

    def _hash_range(self, ids: Sequence[int], start: int, stop: int, parent: int) -> list[int]:
        if stop <= start:
            return []
        bs = self.block_size
        data = array("I", ids[start * bs : stop * bs]).tobytes()
        step = bs * 4
        h = parent if start else self.root
        out = [0] * (stop - start)
        view = memoryview(data)
        for i in range(stop - start):
            h = _hash(view[i * step : (i + 1) * step], h)
            out[i] = h
        return out

    # ---- views ----------------------------------------------------------------------------------
    def view(self, key: str) -> PodView:
        v = self.pods.get(key)
        if v is None:
            v = self.pods[key] = PodView(key)
        return v

    def is_trusted(self, key: str) -> bool:
        v = self.pods.get(key)
        return v is not None and v.trusted

    def _cap(self, key: str) -> int:
        if self.capacity is not None:
            c = self.capacity(key)
            if c > 0:
                return c
        return DEFAULT_CAPACITY_BLOCKS

    @staticmethod
    def _add(v: PodView, h: int) -> None:
        v.blocks[h] = v.blocks.get(h, 0) + 1
        if h not in v.recency:  # blocks sent here at pick time keep that (tail-first) order
            v.recency[h] = None
        v.doomed.pop(h, None)

    @staticmethod
    def _drop(v: PodView, h: int) -> None:
        n = v.blocks.get(h)
        if n is None:
            return
        if n > 1:
            v.blocks[h] = n - 1
        else:
            del v.blocks[h]
            v.doomed.pop(h, None)
            if h not in v.spec:
                v.recency.pop(h, None)

    @staticmethod
    def _clear(v: PodView) -> None:
        v.blocks.clear()
        v.engine.clear()
        v.spec.clear()
        v.recency.clear()
        v.doomed.clear()

    # ---- events (all for one pod, in publisher order) -----------------------------------------
    def stored(
        self,
        key: str,
        block_hashes: Sequence[EngineHash],
        parent: EngineHash | None,
        token_ids: Sequence[int],
        block_size: int,
        *,
        medium: str | None = None,
        lora: bool = False,
        salted: bool = False,
        group: int | None = None,
    ) -> None:
        v = self.view(key)
        n = len(block_hashes)
        if block_size != self.block_size:
            v.skipped += n
            if key not in self._warned:
                self._warned.add(key)
                log.warning(
                    "kv events from %s: block size %d, the precise index uses %d "
                    "(tokenProcessorConfig.blockSize); this pod stays on the approximate index",
                    key, block_size, self.block_size,
                )  # fmt: skip
            v.trusted = False
            return
        if lora or salted or medium not in GPU_MEDIA:
            v.skipped += n
            return
        if group is not None:
            if v.group is None:
                v.group = group
            elif group != v.group:
                v.skipped += n
                return
        if len(token_ids) != n * block_size:
            v.skipped += n
            return
        if parent is None:
            h = self.root
        else:
            ph = v.engine.get(parent)
            if ph is None:
                v.orphans += 1
                v.last_orphan_at = v.stored_since_gap
                return
            h = ph
        try:
            data = array("I", token_ids).tobytes()
        except (OverflowError, TypeError):
            v.skipped += n
            return
        step = block_size * 4
        engine = v.engine
        spec = v.spec
        for i, eh in enumerate(block_hashes):
            h = _hash(data[i * step : (i + 1) * step], h)
            old = engine.get(eh)
            if old == h:
                continue  # the same block announced twice
            if old is not None:
                self._drop(v, old)
            engine[eh] = h
            self._add(v, h)
            spec.pop(h, None)
        v.stored += n
        if v.rebuilding:
            v.stored_since_gap += n
        cap = self._cap(key)
        if len(engine) > cap:
            it = iter(engine)
            over = [next(it) for _ in range(len(engine) - cap)]
            for eh in over:
                self._drop(v, engine.pop(eh))
            v.overflow += len(over)
        if (
            v.rebuilding
            and v.stored_since_gap >= cap
            and v.stored_since_gap - v.last_orphan_at >= cap
        ):
            v.rebuilding = False
            v.trusted = True
            log.info("precise prefix index: %s rebuilt from its events; trusted again", key)

    def removed(self, key: str, block_hashes: Sequence[EngineHash], medium: str | None = None,
                group: int | None = None) -> None:  # fmt: skip
        v = self.pods.get(key)
        if (
            v is None
            or medium not in GPU_MEDIA
            or (group is not None and v.group not in (None, group))
        ):
            return
        engine = v.engine
        for eh in block_hashes:
            h = engine.pop(eh, None)
            if h is None:
                v.unknown_removals += 1
            else:
                self._drop(v, h)
                v.removed += 1

    def cleared(self, key: str) -> None:
        """The engine's cache is empty now (AllBlocksCleared): exact again from here."""
        v = self.view(key)
        self._clear(v)
        v.trusted = True
        v.rebuilding = False

    def stream_started(self, key: str, seq: int) -> None:
        """First batch seen from a publisher (the EPP's start or the publisher's restart)."""
        v = self.view(key)
        self._clear(v)
        if seq == 0:  # a fresh engine: its cache was empty before this batch
            v.trusted = True
            v.rebuilding = False
        else:
            self._untrust(v, f"joined its event stream at sequence {seq}")

    def gap(self, key: str, missed: int) -> None:
        """Batches were lost (`missed` > 0) or may be (0: the publisher disconnected): the
        view may lack stores and hold evicted blocks."""
        v = self.view(key)
        self._clear(v)
        self._untrust(v, f"{missed} event batches lost" if missed else "publisher disconnected")

    def _untrust(self, v: PodView, why: str) -> None:
        v.trusted = False
        v.rebuilding = True
        v.stored_since_gap = 0
        v.last_orphan_at = 0
        log.info("precise prefix index: %s untrusted (%s); approximate until rebuilt", v.key, why)

    def remove_pod(self, key: str) -> None:
        v = self.pods.pop(key, None)
        if v is not None:
            self._clear(v)

    # ---- lookups ------------------------------------------------------------------------------
    def speculate_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` (speculative entries that need work: the rest of a prompt to tokenize)
        before the index is next read and, under a running event loop, right after the
        current callback, so the pick it belongs to does not wait for it."""
        pending = self._pending
        pending.append(fn)
        if len(pending) == 1:
            with contextlib.suppress(RuntimeError):  # no loop: the next read runs it
                asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Run what `speculate_soon` left pending, in order."""
        while self._pending:
            pending, self._pending = self._pending, []
            for fn in pending:
                fn()

    def speculate(
        self, key: str, hashes: Sequence[int], start: int = 0, *, local: bool = True
    ) -> None:
        """The pod was just sent these blocks: count them as held until an event confirms
        them or they expire. `start`: blocks before it are known to be held already.
        `local`: sent by this instance (False: a replica's pick, learnt over sync)."""
        if len(hashes) <= start:
            return
        if local and self.on_speculate is not None:
            # The whole prompt, not from `start`: the receiver's recency order must see its
            # head used again too (else the head is the first thing doomed there).
            self.on_speculate(key, list(hashes))
        v = self.view(key)
        expiry = self.clock() + self.speculative_ttl_s
        added = []
        blocks, spec = v.blocks, v.spec
        for h in hashes[start:] if start else hashes:
            if h in blocks:
                continue
            spec[h] = expiry
            added.append(h)
        if added:
            self._expiries.append((expiry, key, added))
        if self.evict_speculatively:
            self._make_room(v, hashes, expiry)

    def _make_room(self, v: PodView, hashes: Sequence[int], expiry: float) -> None:
        """The prompt's blocks are the pod's most recent now; what its cache cannot hold
        besides them, oldest first, is probably evicted to make room (doomed)."""
        recency, doomed = v.recency, v.doomed
        for h in reversed(hashes):
            recency[h] = None
            recency.move_to_end(h)
            if doomed:
                doomed.pop(h, None)
        excess = len(recency) - self._cap(v.key)
        if excess > 0:
            new = [h for h in itertools.islice(recency, excess) if h not in doomed]
            for h in new:
                doomed[h] = expiry
            if new:
                self._doom_expiries.append((expiry, v.key, new))

    def expire(self) -> None:
        now = self.clock()
        for v, h in self._pop_expired(self._expiries, now, lambda v: v.spec):
            if h not in v.blocks:
                v.recency.pop(h, None)
        # Doomed blocks the engine kept after all (no BlockRemoved came): held again.
        for _ in self._pop_expired(self._doom_expiries, now, lambda v: v.doomed):
            pass

    def _pop_expired(
        self,
        q: deque[tuple[float, str, list[int]]],
        now: float,
        table: Callable[[PodView], dict[int, float]],
    ) -> Iterator[tuple[PodView, int]]:
        """Drop the entries of `q` due by `now` from their pod's `table` (unless set again
        since, with another expiry) and yield each (pod, hash) dropped."""
        while q and q[0][0] <= now:
            expiry, key, hashes = q.popleft()
            v = self.pods.get(key)
            if v is None:
                continue
            entries = table(v)
            for h in hashes:
                if entries.get(h) == expiry:
                    del entries[h]
                    yield v, h

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Longest run of leading blocks each pod holds (confirmed or speculative), for the
        pods holding the first block.

        Each run is found by bisection: an engine's cached blocks are prefix-closed (it
        evicts a sequence's tail before its head, and its lookup stops at the first miss),
        so a request costs one lookup per pod plus a few per pod that holds its start, and
        no block-to-pods map has to be kept."""
        if self._pending:
            self.flush()
        if self._expiries or self._doom_expiries:
            self.expire()
        if not hashes:
            return {}
        h0 = hashes[0]
        return {
            key: self._run(key, hashes, 1)
            for key, v in self.pods.items()
            if (h0 in v.blocks or h0 in v.spec) and h0 not in v.doomed
        }

    def _run(self, key: str, hashes: Sequence[int], lo: int) -> int:
        """Length of the pod's run of held blocks, known to be at least `lo`."""
        v = self.pods[key]
        blocks, spec, doomed = v.blocks, v.spec, v.doomed
        hi = len(hashes)
        h = hashes[hi - 1]
        if (h in blocks or h in spec) and h not in doomed:
            return hi
        while lo < hi - 1:  # held(lo - 1) and not held(hi - 1)
            mid = (lo + hi) // 2
            h = hashes[mid - 1]
            if (h in blocks or h in spec) and h not in doomed:
                lo = mid
            else:
                hi = mid
        return lo

    def confirmed_prefix(self, key: str, hashes: Sequence[int]) -> int:
        """Leading blocks one pod holds according to its events alone (no speculation):
        the engine's own state, what it will report as cached if nothing changes first.
        (Bisection, as in `match`.)"""
        if self._pending:
            self.flush()
        v = self.pods.get(key)
        if v is None or not hashes:
            return 0
        blocks = v.blocks
        lo, hi = 0, len(hashes)
        if hashes[-1] in blocks:
            return hi
        while lo < hi:  # the first block not held
            mid = (lo + hi) // 2
            if hashes[mid] in blocks:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def blocks_held(self, key: str) -> int:
        v = self.pods.get(key)
        return len(v.blocks) if v else 0
