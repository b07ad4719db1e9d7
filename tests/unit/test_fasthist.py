"""The request-path histogram exports what prometheus_client's Histogram exports."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from epp.observability.fasthist import FastCounter, FastHistogram

BUCKETS = (0.00005, 0.001, 0.25, 1.0, 300)


def _exposition(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(ln for ln in text.splitlines() if ln and "_created" not in ln)


def test_same_exposition_as_prometheus_client() -> None:
    ref_reg, fast_reg = CollectorRegistry(), CollectorRegistry()
    ref = Histogram("h_seconds", "help", ["phase"], buckets=BUCKETS, registry=ref_reg)
    fast = FastHistogram("h_seconds", "help", ["phase"], buckets=BUCKETS, registry=fast_reg)
    solo_ref = Histogram("s_ratio", "help", buckets=(0.0, 0.5, 1.0), registry=ref_reg)
    solo = FastHistogram("s_ratio", "help", buckets=(0.0, 0.5, 1.0), registry=fast_reg)
    rng = random.Random(1)
    values = [0.0, 0.00005, 1.0, 300.0, 301.0] + [rng.expovariate(10) for _ in range(500)]
    for v in values:
        phase = rng.choice(["parse", "schedule"])
        ref.labels(phase).observe(v)
        fast.labels(phase).observe(v)
        solo_ref.observe(min(v, 1.0))
        solo.observe(min(v, 1.0))
    assert _exposition(fast_reg) == _exposition(ref_reg)


def test_counter_same_exposition() -> None:
    ref_reg, fast_reg = CollectorRegistry(), CollectorRegistry()
    ref = Counter("picks_total", "help", ["endpoint", "role"], registry=ref_reg)
    fast = FastCounter("picks_total", "help", ["endpoint", "role"], registry=fast_reg)
    for i in range(50):
        for c in (ref, fast):
            c.labels(f"10.0.0.{i % 3}:8000", "decode").inc()
            c.labels("10.0.0.9:8000", "prefill").inc(2)
    assert _exposition(fast_reg) == _exposition(ref_reg)
