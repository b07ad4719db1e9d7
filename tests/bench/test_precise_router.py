"""The `epp:precise` bench variant: the pool publishes KV events only when a router needs
them, and the EPP gets the tokenizer and event flags that match the pool."""

from __future__ import annotations

import pytest

from bench.routers import RouterSpec, RouterUnavailable, _precise_args, prepare_pool
from bench.scenarios import get
from epp.sim.tokenizer import DATA_DIR


def test_precise_variant_turns_the_pools_events_on_and_passes_the_flags() -> None:
    pool = get("shared_prefix").pool
    assert prepare_pool(["epp", "round_robin"], pool) == list(pool)
    with pytest.raises(RouterUnavailable, match="KV events"):
        _precise_args(RouterSpec.parse("epp:precise"), pool)
    ready = prepare_pool(["epp", "epp:precise", "oracle"], pool)
    assert {(c.kv_events_port, c.kv_events_replay_port) for c in ready} == {(5557, 5558)}
    args = _precise_args(RouterSpec.parse("epp:precise"), ready)
    assert args == ["--tokenizer-dir", str(DATA_DIR), "--kv-events-port", "5557",
                    "--kv-events-replay-port", "5558"]  # fmt: skip
    assert _precise_args(RouterSpec.parse("epp"), ready) == []


def test_workload_token_sizes_hold_under_the_simulators_tokenizer() -> None:
    """A scenario's "2000-token system prompt" is 2000 tokens of the real tokenizer too, and
    every reply word is one token (a reply sent back re-tokenizes to the generated ids)."""
    import random

    from bench.scenarios.workload import text_of
    from epp.sim.tokenizer import OUTPUT_WORDS, encode, piece_id

    rng = random.Random(4)
    for n in (1, 60, 2000, 3000):
        assert len(encode(text_of(rng, n))) == n
    for w in OUTPUT_WORDS:
        assert encode(w) == [piece_id(w)]
    reply = "".join(OUTPUT_WORDS[:20])
    assert encode(reply) == [piece_id(w) for w in OUTPUT_WORDS[:20]]
