"""Pick-latency benchmark: the scheduling decision alone, in-process.

    python -m bench.pick [--json] [--iterations N]

One case per (endpoints, prompt tokens): a datastore of N endpoints with live-looking load
signals, a prefix index warmed with earlier conversations, and the default scheduler
configuration. Each iteration runs what the EPP runs per request after the body has
arrived: `Director.admit` (model lookup, candidates, admission, all profiles, accounting,
prefix insert), then the release. `parse_p50_us` is parsing the JSON body on top.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from typing import Any

import orjson

from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint
from epp.requestcontrol.director import Director
from epp.requestcontrol.parse import build_request, parse_body
from epp.scheduling.config import build_scheduler

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
    gc.collect()
    gc.disable()
    try:
        for i, body in enumerate(bodies[64:]):
            t0 = time.perf_counter()
            req = build_request(str(i), "completions", parse_body(body), {})
            t1 = time.perf_counter()
            d = director.admit(req)
            t2 = time.perf_counter()
            parse_us.append((t1 - t0) * 1e6)
            pick_us.append((t2 - t1) * 1e6)
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
        "parse_p50_us": round(statistics.median(parse_us), 1),
        "iterations": len(pick_us),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON object per case")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--case", action="append", default=[], help="ENDPOINTSxTOKENS, e.g. 100x4000")
    a = p.parse_args(argv)
    cases = [tuple(int(x) for x in c.split("x")) for c in a.case] or CASES
    for n, tokens in cases:
        iters = a.iterations if tokens < 50_000 else max(50, a.iterations // 3)
        res = run_case(n, tokens, iters)
        if a.json:
            sys.stdout.write(orjson.dumps(res).decode() + "\n")
        else:
            sys.stdout.write(
                f"{n:>5} endpoints x {tokens:>6} tokens: p50 {res['p50_us']:>8.1f} us  "
                f"p99 {res['p99_us']:>8.1f} us  (parse p50 {res['parse_p50_us']:.1f} us)\n"
            )
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
