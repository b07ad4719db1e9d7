"""Pick-latency benchmark: the scheduling decision alone, in-process.

    python -m bench.pick [--json] [--iterations N]
    python -m bench.pick --precise [--tokenizer-dir DIR]     # precise prefix routing

One case per (endpoints, prompt tokens): a datastore of N endpoints with live-looking load
signals, a prefix index warmed with earlier conversations, and the default scheduler
configuration. Each iteration runs what the EPP runs per request after the body has
arrived: `Director.admit` (model lookup, candidates, admission, all profiles, accounting),
then the release. `parse_p50_us` is parsing the JSON body on top. The approximate prefix
index's insert of the prompt runs after the answer has gone to the gateway (`epp serve`
schedules it right after; the next read of the index would apply it first): it is timed
apart, `index_insert_*_us`; under saturation it delays the next request, not this one.

`--precise`: the same with `bench/scenarios/epp_configs/precise.yaml` (the default policy
with the precise prefix scorer) and a tokenizer (default: the simulator's), on chat
requests: groups whose system prompt is 90% of the prompt (8 groups, fewer when one pod's
cache, 40,000 blocks of 16, could not hold them all: 5 at 100k tokens), and a question of 10%
that no other request shares. Every pod's KV events are emulated after each pick (the chosen pod
stores the prompt's blocks, evicting its oldest beyond its capacity), so the precise index
holds what it would in production. `total_*_us` is `Director.admit` on a request it has
not seen, as in `epp serve`; inside it, `tokenize_*_us` is the time the tokenizer took
(rendering the chat template and tokenizing the request the first time: the shared system
prompt comes from the chunk cache; of the question, only as much as can change the match),
`p50_us`/`p99_us` the rest of the pick (hashing the prompt's blocks, matching both indexes,
every scorer). `after_answer_*_us`: what runs after the answer has gone out, as the
approximate insert does: tokenizing the rest of the prompt for the chosen pod's
speculative entries.

Every line also carries `machine_loop_ms` (`bench.machine`): how fast this machine runs
plain Python, the reference for reading the absolute figures against other machines'.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from bench.machine import python_loop_ms
from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint
from epp.requestcontrol.config import build_request_control
from epp.requestcontrol.director import Director
from epp.requestcontrol.parse import build_request, parse_body
from epp.scheduling.config import build_scheduler
from epp.scheduling.services import Services
from epp.sim.tokenizer import DATA_DIR
from epp.tokenization.tokenizer import PartialIds, TokenizerSet, load_tokenizer

CASES = [(10, 4_000), (100, 4_000), (1000, 4_000), (10, 100_000), (100, 100_000), (1000, 100_000)]
MODEL = "llama-3-8b"


def _words(rng: random.Random, n_bytes: int) -> str:
    vocab = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda", "token"]
    out: list[str] = []
    size = 0
    while size < n_bytes:
        w = rng.choice(vocab)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n_bytes]


def _datastore(n: int, rng: random.Random) -> Datastore:
    ds = Datastore()
    ds.register_source("bench")
    eps = []
    for i in range(n):
        ep = Endpoint(
            f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", 8000, name=f"pod-{i}", model=MODEL
        )
        m = ep.metrics
        m.waiting = rng.randint(0, 4)
        m.running = rng.randint(0, 64)
        m.kv_usage = rng.random() * 0.9
        m.block_size, m.num_blocks = 16, 40_000
        m.updated_at = time.monotonic()
        eps.append(ep)
    ds.replace_endpoints("bench", eps)
    ds.mark_synced("bench")
    return ds


def run_case(
    n_endpoints: int, prompt_tokens: int, iterations: int, seed: int = 1
) -> dict[str, Any]:
    rng = random.Random(seed)
    ds = _datastore(n_endpoints, rng)
    director = Director(ds, build_scheduler(), rng=random.Random(seed))
    prompt_bytes = prompt_tokens * 4
    # Conversations: a shared system prompt per group, a distinct tail per request.
    groups = [_words(rng, prompt_bytes // 2) for _ in range(8)]
    bodies = []
    for i in range(iterations + 64):
        tail = _words(rng, prompt_bytes - len(groups[0]) - 1)
        text = groups[i % len(groups)] + " " + f"{i} " + tail
        bodies.append(orjson.dumps({"model": MODEL, "prompt": text, "max_tokens": 128}))
    decisions = []
    for body in bodies[:64]:  # warm the prefix index and the latency model
        req = build_request("w", "completions", parse_body(body), {})
        decisions.append(director.admit(req))
    for d in decisions:
        director.first_byte(d)
        director.release(d)

    pick_us: list[float] = []
    parse_us: list[float] = []
    insert_us: list[float] = []
    index = director.prefix_index
    gc.collect()
    gc.disable()
    try:
        for i, body in enumerate(bodies[64:]):
            t0 = time.perf_counter()
            req = build_request(str(i), "completions", parse_body(body), {})
            t1 = time.perf_counter()
            d = director.admit(req)
            t2 = time.perf_counter()
            index.flush()  # what `epp serve` runs right after the answer has gone out
            t3 = time.perf_counter()
            parse_us.append((t1 - t0) * 1e6)
            pick_us.append((t2 - t1) * 1e6)
            insert_us.append((t3 - t2) * 1e6)
            director.first_byte(d)
            director.release(d)
    finally:
        gc.enable()
    pick_us.sort()
    leaked = sum(ep.inflight.requests for ep in ds.endpoints())
    assert leaked == 0, f"in-flight leak: {leaked}"
    return {
        "endpoints": n_endpoints,
        "prompt_tokens": prompt_tokens,
        "p50_us": round(statistics.median(pick_us), 1),
        "p99_us": round(pick_us[min(len(pick_us) - 1, int(len(pick_us) * 0.99))], 1),
        "index_insert_p50_us": round(statistics.median(insert_us), 1),
        "index_insert_p99_us": _pct(insert_us, 0.99),
        "parse_p50_us": round(statistics.median(parse_us), 1),
        "iterations": len(pick_us),
    }


T = TypeVar("T")
PRECISE_CONFIG = Path(__file__).parent / "scenarios" / "epp_configs" / "precise.yaml"
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "so", "du", "fa")


def _pseudo(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of the simulator's tokenizer (one per pseudo-word)."""
    return " ".join(rng.choice(SYLLABLES) + rng.choice(SYLLABLES) for _ in range(tokens))


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(len(s) * q))], 1)


def run_precise_case(
    n_endpoints: int, prompt_tokens: int, iterations: int, tokenizer_dir: str, seed: int = 1
) -> dict[str, Any]:
    rng = random.Random(seed)
    ds = _datastore(n_endpoints, rng)
    services = Services(tokenizers=TokenizerSet(load_tokenizer(tokenizer_dir)))
    control = build_request_control(PRECISE_CONFIG.read_text(), services=services)
    director = Director(ds, control.scheduler, hooks=control.hooks, rng=random.Random(seed))
    precise = services.precise
    tok = services.tokenizers.default if services.tokenizers else None
    assert precise is not None and tok is not None
    capacity = 40_000  # the pods' num_blocks (`_datastore`)
    precise.capacity = lambda key: capacity
    for ep in ds.endpoints():
        precise.stream_started(ep.key, 0)  # every pod's event stream seen from its start
    # As many groups (up to 8) as one pod's cache holds with room to spare, so the steady
    # state is prefixes that stay cached, as on a pool sized for its traffic.
    shared = prompt_tokens * 9 // 10
    groups = max(1, min(8, int(capacity * precise.block_size * 0.8) // shared))
    systems = [_pseudo(rng, shared) for _ in range(groups)]
    bodies = []
    for i in range(iterations + 64):
        msgs = [{"role": "system", "content": systems[i % len(systems)]},
                {"role": "user", "content": f"{i}: " + _pseudo(rng, prompt_tokens // 10)}]  # fmt: skip
        bodies.append(orjson.dumps({"model": MODEL, "messages": msgs, "max_tokens": 128}))

    caches: dict[str, OrderedDict[int, None]] = {}
    engine_tok = load_tokenizer(tokenizer_dir)  # the engines' own: the EPP's cache is its own

    def engine_stores(d: Any) -> None:
        """The chosen pod computed the prompt: its KV events say so. Like vLLM's free
        queue, the pod evicts least recently used blocks, a prompt's tail before its head."""
        ids = engine_tok.request_ids("chat", d.request.body) or []
        bs = precise.block_size
        n = len(ids) // bs
        hashes = [(seed << 48) ^ h for h in precise.hash_ids(ids)]  # any engine hashes
        key = d.target.key
        lru = caches.setdefault(key, OrderedDict())
        new = [i for i, h in enumerate(hashes) if h not in lru]
        if new:
            first = new[0]
            precise.stored(key, hashes[first:], hashes[first - 1] if first else None,
                           ids[first * bs : n * bs], bs)  # fmt: skip
        for h in reversed(hashes):
            lru[h] = None
            lru.move_to_end(h)
        evicted = []
        while len(lru) > capacity:
            evicted.append(lru.popitem(last=False)[0])
        if evicted:
            precise.removed(key, evicted)

    for body in bodies[:64]:  # warm the indexes, the chunk cache and the latency model
        d = director.admit(build_request("w", "chat", parse_body(body), {}))
        director.prefix_index.flush()
        precise.flush()
        engine_stores(d)
        director.first_byte(d)
        director.release(d)

    # The pick tokenizes the request itself (once per cycle, as far as some pod may hold
    # the prompt): time that part from inside.
    tokenizing = [0.0]
    request_partial, more, peek = tok.request_partial, PartialIds.more, PartialIds.peek

    def timed(fn: Callable[..., T]) -> Callable[..., T]:
        def run(*args: Any, **kwargs: Any) -> T:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                tokenizing[0] += time.perf_counter() - t

        return run

    tok.request_partial = timed(request_partial)  # type: ignore[method-assign]
    PartialIds.more = timed(more)  # type: ignore[method-assign]
    PartialIds.peek = timed(peek)  # type: ignore[method-assign]

    pick_us: list[float] = []
    tok_us: list[float] = []
    total: list[float] = []
    parse_us: list[float] = []
    after_us: list[float] = []
    gc.collect()
    gc.disable()
    try:
        for i, body in enumerate(bodies[64:]):
            t0 = time.perf_counter()
            data = parse_body(body)
            req = build_request(str(i), "chat", data, {})
            tokenizing[0] = 0.0
            t1 = time.perf_counter()
            d = director.admit(req)  # first sight of this request's text
            t2 = time.perf_counter()
            tok_us.append(tokenizing[0] * 1e6)  # before the emulated engine tokenizes too
            director.prefix_index.flush()  # after the answer, as in `epp serve`
            t3 = time.perf_counter()
            precise.flush()  # the rest of a prompt tokenized for its speculative entries
            after_us.append((time.perf_counter() - t3) * 1e6)
            parse_us.append((t1 - t0) * 1e6)
            total.append((t2 - t1) * 1e6)
            pick_us.append(total[-1] - tok_us[-1])
            engine_stores(d)
            director.first_byte(d)
            director.release(d)
    finally:
        gc.enable()
        PartialIds.more = more  # type: ignore[method-assign]
        PartialIds.peek = peek  # type: ignore[method-assign]
    leaked = sum(ep.inflight.requests for ep in ds.endpoints())
    assert leaked == 0, f"in-flight leak: {leaked}"
    return {
        "mode": "precise",
        "endpoints": n_endpoints,
        "prompt_tokens": prompt_tokens,
        "p50_us": round(statistics.median(pick_us), 1),
        "p99_us": _pct(pick_us, 0.99),
        "tokenize_p50_us": round(statistics.median(tok_us), 1),
        "tokenize_p99_us": _pct(tok_us, 0.99),
        "total_p50_us": round(statistics.median(total), 1),
        "total_p99_us": _pct(total, 0.99),
        "parse_p50_us": round(statistics.median(parse_us), 1),
        "after_answer_p50_us": round(statistics.median(after_us), 1),
        "after_answer_p99_us": _pct(after_us, 0.99),
        "iterations": len(pick_us),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON object per case")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--case", action="append", default=[], help="ENDPOINTSxTOKENS, e.g. 100x4000")
    p.add_argument(
        "--precise",
        action="store_true",
        help="precise prefix routing: tokenizer + KV-event index (default: approximate)",
    )
    p.add_argument(
        "--tokenizer-dir",
        default=str(DATA_DIR),
        help="with --precise: a local Hugging Face tokenizer directory (default: the "
        "simulator's, epp/sim/data/tokenizer)",
    )
    a = p.parse_args(argv)
    cases = [tuple(int(x) for x in c.split("x")) for c in a.case] or CASES
    machine_ms = python_loop_ms()
    for n, tokens in cases:
        iters = a.iterations if tokens < 50_000 else max(50, a.iterations // 3)
        if a.precise:
            res = run_precise_case(n, tokens, iters, a.tokenizer_dir)
        else:
            res = run_case(n, tokens, iters)
        res["machine_loop_ms"] = machine_ms
        if a.json:
            sys.stdout.write(orjson.dumps(res).decode() + "\n")
        elif a.precise:
            sys.stdout.write(
                f"{n:>5} endpoints x {tokens:>6} tokens: pick p50 {res['p50_us']:>8.1f} us  "
                f"p99 {res['p99_us']:>8.1f} us; tokenize p50 {res['tokenize_p50_us']:.1f} "
                f"p99 {res['tokenize_p99_us']:.1f} us; total p99 {res['total_p99_us']:.1f} us\n"
            )
        else:
            sys.stdout.write(
                f"{n:>5} endpoints x {tokens:>6} tokens: p50 {res['p50_us']:>8.1f} us  "
                f"p99 {res['p99_us']:>8.1f} us  (parse p50 {res['parse_p50_us']:.1f} us)\n"
            )
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
