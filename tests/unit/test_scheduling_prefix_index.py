"""Prefix index: chained block hashes, longest-run matching, LRU sized from the engine."""

from __future__ import annotations

import asyncio
import random

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.prefix_index import PrefixIndex

BLOCK = 16  # bytes per block in these tests -> 4 tokens per block


def ep(n: int, *, num_blocks: int = 0, block_size: int = 0) -> Endpoint:
    e = Endpoint(f"127.0.0.{n}", 8000)
    e.metrics.num_blocks = num_blocks
    e.metrics.block_size = block_size
    return e


def blocks(*labels: str) -> bytes:
    """One full block per label, e.g. blocks("a", "b") is 2 blocks."""
    return b"".join(label.encode().ljust(BLOCK, b".") for label in labels)


def test_same_prefix_same_hashes_and_partial_block_ignored() -> None:
    idx = PrefixIndex(block_bytes=BLOCK)
    a = idx.hash_prompt("m", blocks("a", "b", "c"))
    b = idx.hash_prompt("m", blocks("a", "b", "c") + b"partial")
    assert len(a) == 3
    assert a == b  # the trailing partial block is not hashed
    assert len(set(a)) == 3


def test_diverging_block_changes_all_later_hashes() -> None:
    idx = PrefixIndex(block_bytes=BLOCK)
    base = idx.hash_prompt("m", blocks("a", "b", "c", "d"))
    other = idx.hash_prompt("m", blocks("a", "X", "c", "d"))
    assert base[0] == other[0]
    # blocks 2 and 3 have identical bytes but a different prefix: chained hashes differ
    assert all(x != y for x, y in zip(base[1:], other[1:], strict=True))


def test_model_seeds_the_chain() -> None:
    idx = PrefixIndex(block_bytes=BLOCK)
    assert idx.hash_prompt("m1", blocks("a"))[0] != idx.hash_prompt("m2", blocks("a"))[0]


def test_max_blocks_caps_hashing() -> None:
    idx = PrefixIndex(block_bytes=BLOCK, max_blocks=3)
    assert len(idx.hash_prompt("m", blocks(*"abcdef"))) == 3
    assert idx.hash_prompt("m", b"short") == []


def test_match_returns_longest_held_run_per_endpoint() -> None:
    idx = PrefixIndex(block_bytes=BLOCK)
    e1, e2, e3 = ep(1), ep(2), ep(3)
    idx.insert(e1, idx.hash_prompt("m", blocks("a", "b", "c", "d")))
    idx.insert(e2, idx.hash_prompt("m", blocks("a", "b")))
    idx.insert(e3, idx.hash_prompt("m", blocks("z", "b", "c", "d")))
    query = idx.hash_prompt("m", blocks("a", "b", "c", "x", "y"))
    assert idx.match(query) == {e1.key: 3, e2.key: 2}
    # an endpoint holding only a later block (not the first) matches nothing
    assert idx.match(idx.hash_prompt("m", blocks("q", "b"))) == {}
    assert idx.match([]) == {}


def test_match_with_endpoint_that_holds_more_than_others() -> None:
    idx = PrefixIndex(block_bytes=BLOCK)
    e1, e2 = ep(1), ep(2)
    idx.insert(e1, idx.hash_prompt("m", blocks("a")))
    idx.insert(e2, idx.hash_prompt("m", blocks("a", "b", "c")))
    assert idx.match(idx.hash_prompt("m", blocks("a", "b", "c"))) == {e1.key: 1, e2.key: 3}


def test_capacity_from_cache_config_info() -> None:
    idx = PrefixIndex(block_bytes=BLOCK, default_capacity_blocks=77)
    assert idx.block_tokens == 4
    # 2 engine blocks x 8 tokens = 16 tokens = 4 index blocks of 4 tokens
    assert idx.capacity_for(ep(1, num_blocks=2, block_size=8)) == 4
    assert idx.capacity_for(ep(2)) == 77  # unknown cache shape -> default
    assert idx.capacity_for(ep(3, num_blocks=1, block_size=1)) == 1  # never zero


def test_lru_capacity_enforced_and_tail_evicted_before_head() -> None:
    idx = PrefixIndex(block_bytes=BLOCK)
    e = ep(1, num_blocks=2, block_size=8)  # capacity 4 blocks
    long = idx.hash_prompt("m", blocks(*"abcdef"))
    idx.insert(e, long)
    assert idx.blocks_held(e.key) == 4
    # the head of the prefix survived, the tail went
    assert idx.match(long) == {e.key: 4}
    other = idx.hash_prompt("m", blocks("x", "y"))
    idx.insert(e, other)
    assert idx.blocks_held(e.key) == 4
    assert idx.match(long) == {e.key: 2}  # blocks c, d (the tail) evicted first
    assert idx.match(other) == {e.key: 2}


def test_reinsert_refreshes_recency() -> None:
    idx = PrefixIndex(block_bytes=BLOCK)
    e = ep(1, num_blocks=2, block_size=8)  # capacity 4
    p1 = idx.hash_prompt("m", blocks("a", "b"))
    p2 = idx.hash_prompt("m", blocks("c", "d"))
    idx.insert(e, p1)
    idx.insert(e, p2)
    idx.insert(e, p1)  # p1 is now the most recent
    idx.insert(e, idx.hash_prompt("m", blocks("e", "f")))
    assert idx.match(p1) == {e.key: 2}
    assert idx.match(p2) == {}


def test_evicted_blocks_leave_holders() -> None:
    idx = PrefixIndex(block_bytes=BLOCK)
    e1 = ep(1, num_blocks=1, block_size=4)  # capacity 1 block
    e2 = ep(2)
    h = idx.hash_prompt("m", blocks("a", "b"))
    idx.insert(e1, h)
    idx.insert(e2, h)
    assert idx.match(h) == {e1.key: 1, e2.key: 2}
    idx.insert(e1, idx.hash_prompt("m", blocks("z")))
    assert idx.match(h) == {e2.key: 2}


def test_remove_endpoint_cleans_holders() -> None:
    idx = PrefixIndex(block_bytes=BLOCK)
    e1, e2 = ep(1), ep(2)
    shared = idx.hash_prompt("m", blocks("a", "b"))
    only1 = idx.hash_prompt("m", blocks("q", "r"))
    idx.insert(e1, shared)
    idx.insert(e1, only1)
    idx.insert(e2, shared)
    idx.remove_endpoint(e1.key)
    assert idx.blocks_held(e1.key) == 0
    assert idx.match(shared) == {e2.key: 2}
    assert idx.match(only1) == {}
    assert all(e1.key not in hs for hs in idx._holders.values())
    assert not any(h in idx._holders for h in only1)  # no empty holder sets left behind
    idx.remove_endpoint("127.0.0.99:1")  # unknown: no error


def test_remove_blocks() -> None:
    idx = PrefixIndex(block_bytes=BLOCK)
    e1 = ep(1)
    h = idx.hash_prompt("m", blocks("a", "b", "c"))
    idx.insert(e1, h)
    idx.remove_blocks(e1.key, [h[1], 12345])  # unknown hash ignored
    assert idx.blocks_held(e1.key) == 2
    assert idx.match(h) == {e1.key: 1}
    assert h[1] not in idx._holders


def test_matched_blocks_for_agrees_with_match() -> None:
    rng = random.Random(7)
    idx = PrefixIndex(block_bytes=BLOCK)
    eps = [ep(i, num_blocks=rng.choice([0, 6, 10]), block_size=4) for i in range(1, 6)]
    vocab = "abc"
    prompts = [blocks(*(rng.choice(vocab) for _ in range(rng.randint(1, 8)))) for _ in range(60)]
    for p in prompts:
        idx.insert(rng.choice(eps), idx.hash_prompt("m", p))
    checked = 0
    for p in prompts:
        h = idx.hash_prompt("m", p)
        got = idx.match(h)
        for e in eps:
            assert idx.matched_blocks_for(e.key, h) == got.get(e.key, 0)
            checked += got.get(e.key, 0)
    assert checked > 0  # the random workload did produce matches
    assert idx.matched_blocks_for("127.0.0.99:1", h) == 0
    assert idx.matched_blocks_for(eps[0].key, []) == 0


def test_matched_blocks_for_stops_at_a_hole() -> None:
    """A removed middle block (KV BlockRemoved) ends the held run for both lookups."""
    idx = PrefixIndex(block_bytes=BLOCK)
    e1 = ep(1)
    h = idx.hash_prompt("m", blocks("a", "b", "c", "d"))
    idx.insert(e1, h)
    idx.remove_blocks(e1.key, [h[1]])
    assert idx.match(h) == {e1.key: 1}
    assert idx.matched_blocks_for(e1.key, h) == 1


def test_insert_soon_is_seen_by_every_read_in_order() -> None:
    idx = PrefixIndex(block_bytes=BLOCK)
    a, b = ep(1), ep(2, num_blocks=2, block_size=4)  # b holds 2 blocks
    first = idx.hash_prompt("m", blocks("a", "b"))
    second = idx.hash_prompt("m", blocks("c", "d"))
    idx.insert_soon(a, first)
    assert idx.match(first) == {a.key: 2}  # no event loop: the read applies it
    idx.insert_soon(b, first)
    idx.insert_soon(b, second)  # applied in order: the second evicts the first
    assert idx.blocks_held(b.key) == 2
    assert idx.matched_blocks_for(b.key, second) == 2
    assert idx.matched_blocks_for(b.key, first) == 0
    idx.insert_soon(a, second)
    # newest first, each prompt's head more recent than its tail (as `insert` leaves it)
    assert dict(idx.export())[a.key] == [second[0], second[1], first[0], first[1]]


async def test_insert_soon_runs_right_after_the_current_callback() -> None:
    idx = PrefixIndex(block_bytes=BLOCK)
    a = ep(1)
    hashes = idx.hash_prompt("m", blocks("a", "b", "c"))
    idx.insert_soon(a, hashes)
    assert idx._pending  # the pick's answer goes out first
    await asyncio.sleep(0)
    assert not idx._pending
    assert idx.match(hashes) == {a.key: 3}
