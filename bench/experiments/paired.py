"""Two routers on the same schedules in virtual time, compared pair by pair.

    python -m bench.experiments.paired --base epp --alt epp:hardware \\
        --cells bursts@9,kv_pressure@8 --seeds 0,100,200,300,400,500,600,700,800,900

Each cell (scenario@rate) runs both routers on every seed's schedule; the difference of
their TTFT p90 (the steady tenant's on multi_tenant) is taken per schedule, and its mean
gets a 95% bootstrap interval. Pairing removes the schedule-to-schedule spread that the
sweep's medians carry, so a small but consistent change shows beyond the noise. Routers are
named as in `bench.experiments.sweep` (`epp:<file in --configs>`, `epp:default?k=v`).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor

from bench.experiments.sweep import CONFIGS_DIR, Job, _one, add_phase_args, quality_key

BOOTSTRAP_RESAMPLES = 2000


def bootstrap_mean_ci(values: list[float], seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of `values` (percentile bootstrap)."""
    rng = random.Random(seed)
    means = sorted(
        statistics.fmean(rng.choices(values, k=len(values))) for _ in range(BOOTSTRAP_RESAMPLES)
    )
    return means[int(0.025 * BOOTSTRAP_RESAMPLES)], means[int(0.975 * BOOTSTRAP_RESAMPLES) - 1]


def _cell(text: str) -> tuple[str, float]:
    scenario, sep, rate = text.partition("@")
    if not sep:
        raise argparse.ArgumentTypeError(f"a cell is scenario@rate, not {text!r}")
    return scenario, float(rate)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="epp")
    p.add_argument("--alt", required=True)
    p.add_argument("--cells", required=True, help="comma list of scenario@rate")
    p.add_argument("--seeds", default="0,100,200,300,400,500,600,700,800,900")
    p.add_argument("--configs", default=str(CONFIGS_DIR))
    p.add_argument("--jobs", type=int, default=2)
    add_phase_args(p)
    a = p.parse_args(argv)
    cells = [_cell(c) for c in a.cells.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    jobs: list[Job] = [(sc, r, rate, seed, a.configs, a.time_scale, a.requests)
            for sc, rate in cells for seed in seeds for r in (a.base, a.alt)]  # fmt: skip
    with ProcessPoolExecutor(a.jobs) as ex:
        rows = list(ex.map(_one, jobs))
    p90 = {(r["sc"], r["rate"], r["seed"], r["router"]): r[quality_key(r["sc"])] for r in rows}
    print(f"| cell | {a.base} | {a.alt} | paired difference [95% CI] | {a.alt} lower |")
    print("|---|---|---|---|---|")
    for sc, rate in cells:
        base = [p90[(sc, rate, s, a.base)] for s in seeds]
        alt = [p90[(sc, rate, s, a.alt)] for s in seeds]
        diff = [y - x for x, y in zip(base, alt, strict=True)]
        lo, hi = bootstrap_mean_ci(diff)
        lower = sum(d < 0 for d in diff)
        print(
            f"| {sc} @ {rate:g} | {statistics.fmean(base):.3f} | {statistics.fmean(alt):.3f} "
            f"| {statistics.fmean(diff):+.3f} [{lo:+.3f}, {hi:+.3f}] | {lower}/{len(seeds)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
