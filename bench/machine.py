"""How fast this machine runs plain Python, to read a benchmark's figures against.

Absolute timings differ between machines of the same shape by 2x or more (bench/RESULTS.md
§1, §2), so the micro-benchmarks print `machine_loop_ms` beside their figures: the fastest
of five runs of one fixed pure-Python loop. Two results are comparable when these are
close; otherwise compare ratios measured in one run.
"""

from __future__ import annotations

import time

LOOP_N = 1_000_000


def python_loop_ms(repeats: int = 5) -> float:
    """Milliseconds of `sum(i * i for i in range(1_000_000))`, the fastest of `repeats`
    (about 50 ms on a current desktop core)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sum(i * i for i in range(LOOP_N))
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000.0, 1)
