"""Precise prefix routing: the index built from KV events, its trust rules, the scorer's
config (llm-d's shape), and predictions that match what a paged KV cache reports."""

from __future__ import annotations

import random
import time
from typing import Any

import msgpack
import pytest

from epp.clock import set_clock
from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint
from epp.datalayer.kv_events import BlockStored, KVEventSubscriber, decode_batch
from epp.requestcontrol.config import build_request_control
from epp.requestcontrol.director import Director
from epp.requestcontrol.kv_sync import PrefixIndexKVSync
from epp.requestcontrol.parse import build_request
from epp.scheduling.config import ConfigError
from epp.scheduling.plugins.common import prompt_tokens
from epp.scheduling.precise_index import PreciseIndex
from epp.scheduling.prefix_index import PrefixIndex
from epp.scheduling.request import CycleState
from epp.scheduling.services import Services
from epp.sim.kvcache import ROOT_HASH, BlockPool, chain_hash
from epp.sim.tokenizer import DATA_DIR, sim_tokenizer
from epp.tokenization import load_tokenizer
from epp.tokenization.tokenizer import TokenizerSet

BS = 4


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def store_chain(idx: PreciseIndex, key: str, ids: list[int], tag: int = 0) -> list[int]:
    """Store `ids` (whole blocks) one block per event, engine hashes tag*1000+i."""
    engine: list[int] = []
    for i in range(len(ids) // idx.block_size):
        eh = tag * 1000 + i
        parent = engine[-1] if engine else None
        idx.stored(key, [eh], parent, ids[i * BS : (i + 1) * BS], BS)
        engine.append(eh)
    return engine


# ---- the index ----------------------------------------------------------------------------
def test_stored_chains_match_and_removals_are_exact() -> None:
    idx = PreciseIndex(BS)
    idx.stream_started("a", 0)
    ids = toks(20)
    eng = store_chain(idx, "a", ids)
    assert idx.is_trusted("a")
    assert idx.match(idx.hash_ids(ids)) == {"a": 5}
    assert idx.match(idx.hash_ids(ids[:8] + [99] * 12)) == {"a": 2}
    # vLLM batches: several blocks in one event, token ids concatenated
    idx.stored("b", [7, 8], None, ids[:8], BS)
    assert idx.match(idx.hash_ids(ids)) == {"a": 5, "b": 2}
    idx.removed("a", [eng[4], eng[3]])
    assert idx.match(idx.hash_ids(ids)) == {"a": 3, "b": 2}
    idx.removed("a", [12345])  # not known: counted, harmless
    assert idx.pods["a"].unknown_removals == 1
    # a store whose parent the EPP never saw cannot be placed in a chain
    idx.stored("a", [555], 777, toks(4, 50), BS)
    assert idx.pods["a"].orphans == 1 and idx.blocks_held("a") == 3


def test_trust_follows_the_event_stream() -> None:
    idx = PreciseIndex(BS)
    ids = toks(16)
    idx.stream_started("late", 41)  # joined mid-stream: history unknown
    store_chain(idx, "late", ids)
    assert not idx.is_trusted("late") and idx.match(idx.hash_ids(ids)) == {"late": 4}
    idx.cleared("late")  # AllBlocksCleared: the cache is empty, known exactly from here
    assert idx.is_trusted("late") and idx.blocks_held("late") == 0
    store_chain(idx, "late", ids)
    idx.gap("late", 3)  # lost batches: cleared and untrusted
    assert not idx.is_trusted("late") and idx.blocks_held("late") == 0
    idx.stream_started("late", 0)  # the publisher restarted and we saw it from the start
    assert idx.is_trusted("late")


def test_an_untrusted_view_is_trusted_again_once_the_cache_turned_over() -> None:
    idx = PreciseIndex(BS, capacity=lambda key: 8)
    idx.stream_started("p", 9)
    store_chain(idx, "p", toks(4 * 6), tag=1)
    assert not idx.is_trusted("p")
    idx.stored("p", [999], 424242, toks(4, 100), BS)  # extends a prefix we never saw
    store_chain(idx, "p", toks(4 * 6, 200), tag=2)
    assert not idx.is_trusted("p")  # the orphan was less than a cache ago
    store_chain(idx, "p", toks(4 * 8, 400), tag=3)
    assert idx.is_trusted("p")
    assert idx.blocks_held("p") <= 8  # bounded by the pod's capacity
    assert idx.pods["p"].overflow > 0


def test_speculative_entries_expire_unless_confirmed() -> None:
    clock = Clock()
    idx = PreciseIndex(BS, speculative_ttl_s=5.0, clock=clock)
    ids = toks(12)
    hashes = idx.hash_ids(ids)
    idx.stream_started("a", 0)
    idx.speculate("a", hashes)
    idx.speculate("b", hashes)
    assert idx.match(hashes) == {"a": 3, "b": 3}
    store_chain(idx, "a", ids)  # the engine confirms a's blocks
    clock.t = 6.0
    assert idx.match(hashes) == {"a": 3}
    assert not idx.pods["b"].spec and hashes[0] in idx.pods["a"].blocks


def test_blocks_sent_to_a_full_pod_doom_its_least_recent_ones() -> None:
    """A pod's cache holds 6 blocks: sending it 4 new ones evicts its 4 least recent, a
    prompt's tail before its head. They stop counting at once, not when the engine's
    BlockRemoved arrives; if it never does (the engine kept them), they count again."""
    clock = Clock()
    idx = PreciseIndex(BS, clock=clock, speculative_ttl_s=5.0, capacity=lambda key: 6)
    idx.stream_started("a", 0)
    old, mid, new = toks(12), toks(12, 50), toks(16, 100)  # 3, 3 and 4 blocks
    for ids, tag in ((old, 1), (mid, 2)):
        idx.speculate("a", idx.hash_ids(ids))  # sent here (the pick) ...
        store_chain(idx, "a", ids, tag)  # ... and computed (the events)
    assert idx.match(idx.hash_ids(old)) == {"a": 3} and idx.match(idx.hash_ids(mid)) == {"a": 3}
    idx.speculate("a", idx.hash_ids(new))
    assert idx.match(idx.hash_ids(old)) == {}  # all of `old`
    assert idx.match(idx.hash_ids(mid)) == {"a": 2}  # and `mid`'s tail
    assert idx.match(idx.hash_ids(new)) == {"a": 4}
    idx.removed("a", [1000, 1001, 1002])  # the engine confirms `old`
    clock.t += 6
    assert idx.match(idx.hash_ids(old)) == {}
    assert idx.match(idx.hash_ids(mid)) == {"a": 3}  # never evicted after all
    off = PreciseIndex(BS, capacity=lambda key: 6)
    off.evict_speculatively = False
    off.stream_started("a", 0)
    store_chain(off, "a", old, 1)
    store_chain(off, "a", mid, 2)
    off.speculate("a", off.hash_ids(new))
    assert off.match(off.hash_ids(old)) == {"a": 3}


def test_events_for_another_block_size_lora_or_cpu_are_not_indexed() -> None:
    idx = PreciseIndex(BS)
    idx.stream_started("a", 0)
    idx.stored("a", [1], None, toks(8), 8)
    assert not idx.is_trusted("a")  # the config's blockSize does not match the engine's
    idx.cleared("a")
    idx.stored("a", [1], None, toks(4), BS, lora=True)
    idx.stored("a", [2], None, toks(4), BS, medium="CPU")
    idx.stored("a", [3], None, toks(4), BS, salted=True)
    assert idx.blocks_held("a") == 0 and idx.pods["a"].skipped == 1 + 3


def test_map_encoded_events_of_newer_vllm_decode() -> None:
    stored = {"type": "BlockStored", "block_hashes": [2**64 - 1], "parent_block_hash": None,
              "token_ids": toks(4), "block_size": 4, "lora_id": None, "medium": "GPU",
              "lora_name": None, "extra_keys": [None], "group_idx": 0,
              "kv_cache_spec_kind": "full_attention"}  # fmt: skip
    removed = {"type": "BlockRemoved", "block_hashes": [2**64 - 1], "medium": "GPU"}
    batch = decode_batch(msgpack.packb([1.0, [stored, removed, {"type": "AllBlocksCleared"}], 0]))
    ev = batch.events[0]
    assert isinstance(ev, BlockStored) and ev.block_hashes == (2**64 - 1,)
    assert ev.group_idx == 0 and ev.spec_kind == "full_attention" and not ev.keyed_beyond_tokens
    assert len(batch.events) == 3 and batch.skipped == 0
    salted = decode_batch(msgpack.packb([1.0, [{**stored, "extra_keys": [["salt"]]}]]))
    assert salted.events[0].keyed_beyond_tokens  # type: ignore[union-attr]


# ---- configuration --------------------------------------------------------------------------
LLMD_GUIDE = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: single-profile-handler
  - type: tokenizer
    parameters:
      modelName: Qwen/Qwen3-32B
      udsTokenizerConfig:
        socketFile: /tmp/tokenizer/tokenizer-uds.socket
  - type: precise-prefix-cache-scorer
    parameters:
      tokenProcessorConfig:
        blockSize: 64
      indexerConfig:
        speculativeIndexing: true
        tokenizersPoolConfig:
          modelName: Qwen/Qwen3-32B
          local: null
          hf: null
          uds:
            socketFile: /tmp/tokenizer/tokenizer-uds.socket
      kvEventsConfig:
        topicFilter: "kv@"
        concurrency: 4
        discoverPods: false
        zmqEndpoint: "tcp://*:5557"
  - type: kv-cache-utilization-scorer
  - type: queue-scorer
  - type: max-score-picker
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: precise-prefix-cache-scorer
        weight: 3.0
      - pluginRef: kv-cache-utilization-scorer
        weight: 2.0
      - pluginRef: queue-scorer
        weight: 2.0
      - pluginRef: max-score-picker
"""

LLMD_OLDER = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: single-profile-handler
- type: decode-filter
- type: precise-prefix-cache-scorer
  parameters:
    kvEventsConfig:
      zmqEndpoint: "tcp://*:5557"
      topicFilter: "kv"
    indexerConfig:
      tokenProcessorConfig:
        blockSize: 64
        hashSeed: "42"
      kvBlockIndexConfig:
        enableMetrics: true
        metricsLoggingInterval: 60000000000
- type: kv-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: precise-prefix-cache-scorer
    weight: 3.0
  - pluginRef: kv-cache-scorer
    weight: 1.0
  - pluginRef: max-score-picker
"""


def tokenized() -> Services:
    return Services(tokenizers=TokenizerSet(sim_tokenizer()))


@pytest.mark.parametrize("text", [LLMD_GUIDE, LLMD_OLDER])
def test_llm_d_precise_configs_load(text: str) -> None:
    svc = tokenized()
    control = build_request_control(text, services=svc)
    assert svc.precise is not None and svc.precise.block_size == 64
    assert svc.kv_events.bind == ["tcp://*:5557"]
    assert svc.kv_events.topic_filter in ("kv@", "kv")
    scorers = [ws.scorer.type_name for ws in control.scheduler.profiles["default"].scorers]
    assert "precise-prefix-cache-scorer" in scorers


def test_unknown_parameters_and_a_missing_tokenizer_are_config_errors() -> None:
    bad = LLMD_OLDER.replace("hashSeed: \"42\"", "hashSeed: \"42\"\n        blokSize: 16")
    with pytest.raises(ConfigError, match="blokSize"):
        build_request_control(bad, services=tokenized())
    bad = LLMD_GUIDE.replace("concurrency: 4", "concurency: 4")
    with pytest.raises(ConfigError, match="concurency"):
        build_request_control(bad, services=tokenized())
    with pytest.raises(ConfigError, match="--tokenizer-dir"):
        build_request_control(LLMD_GUIDE, services=Services())
    fallback = Services(tokenizer_fallback=True)
    build_request_control(LLMD_GUIDE, services=fallback)  # logged, approximate instead
    assert fallback.precise is not None


# ---- predictions against a paged KV cache with prefix caching -----------------------------------
PRECISE_CONFIG = """
plugins:
- type: precise-prefix-cache-scorer
  parameters:
    tokenProcessorConfig: {blockSize: 16}
- type: inflight-scorer
- type: max-score-picker
  parameters: {seed: 1}  # ties broken the same way every run: the picks are reproducible
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: precise-prefix-cache-scorer
    weight: 2
  - pluginRef: inflight-scorer
  - pluginRef: max-score-picker
"""


class Engine:
    """The simulator's block pool served one request at a time, publishing its KV events
    as frames in vLLM's wire format."""

    def __init__(self, key: str, blocks: int) -> None:
        self.key = key
        self.blocks = blocks
        self.restart()

    def restart(self) -> None:
        self.pool = BlockPool(self.blocks, 16)
        self.seq = 0

    def serve(self, ids: list[int]) -> tuple[int, list[bytes]]:
        bs = 16
        hashes, parent = [], ROOT_HASH
        for j in range(len(ids) // bs):
            parent = chain_hash(parent, ids[j * bs : (j + 1) * bs])
            hashes.append(parent)
        hit = self.pool.lookup_prefix(hashes)
        if len(hit) * bs >= len(ids):
            hit = hit[:-1]
        self.pool.touch(hit)
        new = self.pool.allocate(-(-len(ids) // bs) - len(hit))
        assert new is not None
        blocks = hit + new
        for j in range(len(hit), len(hashes)):
            prev = hashes[j - 1] if j else None
            self.pool.commit(blocks[j], hashes[j], prev, ids[j * bs : (j + 1) * bs])
        self.pool.free(blocks)
        events, self.pool.events = self.pool.events, []
        frame = [f"kv@{self.key}@m".encode(), self.seq.to_bytes(8, "big"),
                 msgpack.packb([time.time(), events, 0], use_bin_type=True)]  # fmt: skip
        self.seq += 1
        return len(hit) * bs, frame


def test_predicted_cached_tokens_match_the_engine_through_evictions_and_a_restart() -> None:
    svc = tokenized()
    control = build_request_control(PRECISE_CONFIG, services=svc)
    ds = Datastore()
    eps = [Endpoint(f"127.0.0.{i + 2}", 8000, model="m") for i in range(3)]
    for e in eps:
        e.metrics.block_size, e.metrics.num_blocks = 16, 300
        ds.upsert_endpoint("t", e)
    director = Director(ds, control.scheduler, hooks=control.hooks, rng=random.Random(1))
    assert svc.precise is not None
    svc.precise.capacity = lambda key: 300
    sync = PrefixIndexKVSync(director.prefix_index, precise=svc.precise)
    sub = KVEventSubscriber(on_event=sync.on_event, on_gap=sync.on_gap, on_stream=sync.on_stream)
    engines = {e.key: Engine(e.key, 300) for e in eps}  # ~4800 tokens each: evictions
    # A fake clock, 4 requests a second: the picks (load model, expiries) do not depend on
    # how fast this machine runs the test.
    fake = Clock()
    svc.precise.clock = fake
    set_clock(fake)
    try:
        exact, total = _serve_400(director, svc, sub, eps, engines, fake)
    finally:
        set_clock(None)
    assert sub.events > 0 and sub.gaps >= 1  # the restart was seen
    assert exact / total >= 0.99, (exact, total)
    assert any(v.removed for v in svc.precise.pods.values())  # evictions happened
    assert all(v.trusted for v in svc.precise.pods.values())


def _serve_400(
    director: Director,
    svc: Services,
    sub: KVEventSubscriber,
    eps: list[Endpoint],
    engines: dict[str, Any],
    fake: Clock,
) -> tuple[int, int]:
    rng = random.Random(5)
    words = ["kalo", "mine", "ruta", "vozi", "pedu", "sofa", "zine", "tafa"]
    systems = [" ".join(rng.choice(words) for _ in range(rng.randint(300, 900))) for _ in range(9)]
    exact = total = 0
    for i in range(400):
        fake.t += 0.25
        if i == 200:
            engines[eps[0].key].restart()  # a new engine process: empty cache, sequence 0
        msgs = [{"role": "system", "content": rng.choice(systems)},
                {"role": "user", "content": " ".join(rng.choice(words) for _ in range(20))}]  # fmt: skip
        req = build_request(str(i), "chat", {"model": "m", "messages": msgs}, {})
        d = director.admit(req)
        predicted = d.result.predicted_cached_tokens
        ids = sim_tokenizer().request_ids("chat", {"messages": msgs})
        # exact where the prompt was tokenized whole; estimated when its fresh tail was not
        assert ids is not None and abs(req.prompt_tokens - len(ids)) <= len(ids) // 10
        reported, frame = engines[d.target.key].serve(ids)
        sub.handle_frames(frame)
        director.release(d)
        if i >= 20:
            total += 1
            exact += predicted is not None and abs(predicted - reported) < 16
    return exact, total


def lazy_prompt(held_blocks: dict[str, int], cached_head: int = 0) -> tuple[Any, ...]:
    """Pods holding the first `held_blocks[key]` blocks of a long prompt, a fresh tokenizer
    that has seen its first `cached_head` words: the cycle's PromptTokens, the tokenizer,
    the index and the prompt's block hashes."""
    tok = load_tokenizer(DATA_DIR, chunk_chars=64)
    svc = Services(tokenizers=TokenizerSet(tok))
    build_request_control(PRECISE_CONFIG, services=svc)
    precise = svc.precise
    assert precise is not None
    rng = random.Random(12)
    words = ["kalo", "mine", "ruta", "vozi", "pedu", "sofa", "zine", "tafa"]
    prompt = [rng.choice(words) for _ in range(3000)]
    ids = load_tokenizer(DATA_DIR).request_ids("completions", {"prompt": " ".join(prompt)})
    assert ids is not None
    bs = precise.block_size
    for key, n in held_blocks.items():
        n = min(n, len(ids) // bs)
        precise.stream_started(key, 0)
        precise.stored(key, list(range(n)), None, ids[: n * bs], bs)
    if cached_head:
        tok.encode(" ".join(prompt[:cached_head]), True)
    encoded = tok.stats.tokens_encoded
    req = build_request("r", "completions", {"model": "m", "prompt": " ".join(prompt)}, {})
    pt = prompt_tokens(CycleState(), svc, req)
    assert pt is not None and req.prompt_tokens == pt.count
    assert pt.held == precise.match(precise.hash_ids(ids))  # as if tokenized whole
    assert abs(pt.count - len(ids)) <= len(ids) // 10
    return pt, tok.stats.tokens_encoded - encoded, len(ids)


def test_the_prompt_is_tokenized_only_as_far_as_a_pod_may_hold_it() -> None:
    pt, encoded, n = lazy_prompt({})  # nobody holds anything: one chunk is enough to know
    assert not pt.exact and encoded < 40 and pt.held == {}
    pt, encoded, n = lazy_prompt({"a": 10, "b": 40})
    assert not pt.exact and 40 * 16 <= encoded < n // 2 and pt.held == {"a": 10, "b": 40}
    pt, encoded, n = lazy_prompt({"a": 40}, cached_head=2000)  # a cached head is free
    assert not pt.exact and encoded < 100
    pt, encoded, n = lazy_prompt({"a": 10, "c": 10**6})  # one pod holds it all
    assert pt.exact and pt.count == n and encoded == n and pt.held["c"] == n // 16


def test_a_fresh_question_after_a_held_system_prompt_costs_a_few_words_to_rule_out() -> None:
    """The system prompt's chunks are cached and a pod holds its blocks: the block that
    starts the new question is told from a short piece of text, not a 1 k-character chunk,
    and the pods' matches are what tokenizing the whole prompt gives, also when a pod
    holds that block and more."""
    rng = random.Random(5)
    words = ["kalo", "mine", "ruta", "vozi", "pedu", "sofa", "zine", "tafa"]
    system = " ".join(rng.choice(words) for _ in range(1500))

    def chat(question: str) -> dict[str, Any]:
        return {"model": "m", "messages": [{"role": "system", "content": system},
                                           {"role": "user", "content": question}]}  # fmt: skip

    engine = load_tokenizer(DATA_DIR)
    body = chat("what is up " * 100)
    ids = engine.request_ids("chat", body)
    other = engine.request_ids("chat", chat("how are you " * 100))
    assert ids is not None and other is not None

    def pick(holders: dict[str, list[int]]) -> tuple[Any, int, list[int], Any]:
        tok = load_tokenizer(DATA_DIR)  # the default 1 k-character chunks
        svc = Services(tokenizers=TokenizerSet(tok))
        build_request_control(PRECISE_CONFIG, services=svc)
        precise = svc.precise
        assert precise is not None and tok.chunking
        bs = precise.block_size
        for key, held in holders.items():
            n = len(held) // bs
            precise.stream_started(key, 0)
            precise.stored(key, [hash((key, i)) for i in range(n)], None, held[: n * bs], bs)
        tok.request_ids("chat", chat("hello there " * 100))  # the EPP has seen the system
        chars = tok.stats.chars_encoded
        pt = prompt_tokens(CycleState(), svc, build_request("r", "chat", body, {}))
        whole = precise.hash_ids(ids)
        assert pt is not None and pt.held == precise.match(whole)  # as if tokenized whole
        return pt, tok.stats.chars_encoded - chars, whole, precise

    pt, chars, whole, precise = pick({"a": other})
    assert not pt.exact and 0 < pt.held["a"] < len(whole) and chars < 400  # a chunk: ~1000
    assert pt.complete(precise) == whole  # the peeked block is not kept past the pick
    pt, chars, whole, _ = pick({"a": other, "b": ids})  # "b" holds the peeked block too
    assert pt.exact and pt.held["b"] == len(whole) and chars > 1000


def test_a_cold_prompt_is_speculated_whole_once_the_pick_is_made() -> None:
    """The pick tokenizes a cold prompt only up to its first chunk; the chosen pod's
    speculative entries still cover all of it (tokenized after the pick), so the group's
    next request, before any KV event, follows it there for the whole prompt."""
    tok = load_tokenizer(DATA_DIR, chunk_chars=64)
    svc = Services(tokenizers=TokenizerSet(tok))
    control = build_request_control(PRECISE_CONFIG, services=svc)
    precise = svc.precise
    assert precise is not None
    ds = Datastore()
    for i in range(3):
        e = Endpoint(f"127.0.0.{i + 2}", 8000, model="m")
        ds.upsert_endpoint("t", e)
        precise.stream_started(e.key, 0)
    director = Director(ds, control.scheduler, hooks=control.hooks, rng=random.Random(1))
    rng = random.Random(3)
    words = ["kalo", "mine", "ruta", "vozi", "pedu", "sofa"]
    system = " ".join(rng.choice(words) for _ in range(1500))
    body = {"model": "m", "messages": [{"role": "system", "content": system},
                                       {"role": "user", "content": "first"}]}  # fmt: skip
    d = director.admit(build_request("a", "chat", body, {}))
    ids = load_tokenizer(DATA_DIR).request_ids("chat", body)
    assert ids is not None and tok.stats.tokens_encoded < len(ids) // 4  # the pick: a head
    whole = len(ids) // precise.block_size
    assert precise.match(precise.hash_ids(ids)) == {d.target.key: whole}
    body2 = {**body, "messages": [body["messages"][0], {"role": "user", "content": "second"}]}
    d2 = director.admit(build_request("b", "chat", body2, {}))
    assert d2.target.key == d.target.key
    director.release(d)
    director.release(d2)


def test_sim_tokenizer_dir_is_what_the_epp_loads() -> None:
    assert (DATA_DIR / "tokenizer.json").is_file() and sim_tokenizer().chunking


# ---- replay: what the EPP missed before it joined, from the publisher's replay socket ---------
async def test_a_late_subscriber_is_trusted_after_replaying_the_stream() -> None:
    import asyncio

    from epp.devstack.procs import free_port
    from epp.sim.config import make_config
    from epp.sim.kvevents import KVEventPublisher

    cfg = make_config(host="127.0.0.1", port=8000, kv_events_port=free_port(),
                      kv_events_replay_port=free_port())  # fmt: skip
    pub = KVEventPublisher(cfg)
    pub.start_replay()
    pool = BlockPool(64, BS)
    idx = PreciseIndex(BS)
    streams: list[tuple[str, int]] = []
    sync = PrefixIndexKVSync(director_index(), precise=idx)

    def on_stream(key: str, seq: int) -> None:
        streams.append((key, seq))
        sync.on_stream(key, seq)

    def store(ids: list[int]) -> None:
        parent = None
        for j in range(len(ids) // BS):
            h = chain_hash(parent or ROOT_HASH, ids[j * BS : (j + 1) * BS])
            (b,) = pool.allocate(1) or []
            pool.commit(b, h, parent, ids[j * BS : (j + 1) * BS])
            parent = h
        pub.publish(pool.events)
        pool.events = []

    try:
        early = toks(16, 1000)
        store(early)  # published before anyone listens: lost on the PUB socket
        sub = KVEventSubscriber(on_event=sync.on_event, on_gap=sync.on_gap, on_stream=on_stream)
        sub.add("127.0.0.1:8000", pub.endpoint,
                replay=f"tcp://127.0.0.1:{cfg.kv_events_replay_port}")  # fmt: skip
        await sub.start()
        await asyncio.sleep(0.3)  # connected
        late = toks(8, 2000)
        store(late)
        for _ in range(100):
            if idx.blocks_held("127.0.0.1:8000") >= 6:
                break
            await asyncio.sleep(0.02)
        assert streams == [("127.0.0.1:8000", 0)]  # seen from sequence 0, thanks to the replay
        assert sub.replayed == 1 and idx.is_trusted("127.0.0.1:8000")
        assert idx.match(idx.hash_ids(early)) == {"127.0.0.1:8000": 4}
        await sub.stop()
    finally:
        pub.close()


def director_index() -> PrefixIndex:
    return PrefixIndex()


def test_block_hashes_reused_per_chunk_equal_hashing_every_block() -> None:
    tok = sim_tokenizer()
    idx = PreciseIndex(16)
    rng = random.Random(9)
    words = ["kalo", "mine", "ruta", "vozi", "the", "of", "x=1;", "\n", "naïve"]
    system = " ".join(rng.choice(words) for _ in range(3000))
    for i in range(6):
        tail = " ".join(rng.choice(words) for _ in range(rng.randint(0, 400)))
        body = {"messages": [{"role": "system", "content": system},
                             {"role": "user", "content": f"{i} {tail}"}]}  # fmt: skip
        marks: list[tuple[int, int]] = []
        ids = tok.request_ids("chat", body, marks)
        assert ids is not None and marks  # long enough to be chunked
        assert idx.hash_prompt(ids, marks) == idx.hash_ids(ids)
        completion = tok.request_ids("completions", {"prompt": system + tail}, marks := [])
        assert completion is not None
        assert idx.hash_prompt(completion, marks) == idx.hash_ids(completion)
    assert len(idx._chunk_hashes) > 0


async def test_a_replay_socket_that_does_not_answer_is_no_proof() -> None:
    import asyncio

    from epp.devstack.procs import free_port
    from epp.sim.config import make_config
    from epp.sim.kvevents import KVEventPublisher

    cfg = make_config(host="127.0.0.1", port=8000, kv_events_port=free_port())
    pub = KVEventPublisher(cfg)  # no replay socket behind the address given below
    idx = PreciseIndex(BS)
    sync = PrefixIndexKVSync(director_index(), precise=idx)
    sub = KVEventSubscriber(on_event=sync.on_event, on_gap=sync.on_gap, on_stream=sync.on_stream)
    sub.replay_timeout_s = 0.3
    try:
        pub.publish([["AllBlocksCleared"]])  # seq 0, before anyone listens: lost
        sub.add("127.0.0.1:8000", pub.endpoint, replay=f"tcp://127.0.0.1:{free_port()}")
        await sub.start()
        await asyncio.sleep(0.2)
        pub.publish([["BlockStored", [1], None, toks(BS), BS, None, None]])  # seq 1
        await asyncio.sleep(0.8)
        assert sub.replay_failures >= 1 and sub.replayed == 0
        assert not idx.is_trusted("127.0.0.1:8000")  # joined at sequence 1, history unknown
        await sub.stop()
    finally:
        pub.close()
