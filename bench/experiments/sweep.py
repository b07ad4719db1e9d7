"""Policy sweep in virtual time: every quality scenario x rate x seed for a set of routers.

    python -m bench.experiments.sweep --routers cache_aware,epp,epp:delay [--seeds 1,2,3]
    python -m bench.experiments.sweep --routers "cache_aware,epp:default?stallWeight=0.25"
    python -m bench.experiments.sweep --rate-scales 1,1.5   # and each rate x 1.5 (overload)

Prints, per scenario and rate, each router's TTFT p90 (median over seeds, [min, max]),
TTFT p50, cached share and goodput; and a last line per router: how many cells it wins or
ties (within 3%) against the best non-EPP router.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.scenarios import get
from bench.vsim.api import run
from epp.scheduling.config import DEFAULT_CONFIG

SCENARIOS = ["shared_prefix", "bursts", "mixed", "kv_pressure", "hot_prefix", "hetero",
             "multi_tenant", "multi_turn"]


CONFIGS_DIR = Path(__file__).parents[1] / "scenarios" / "epp_configs"


def quality_key(scenario: str) -> str:
    """The row field a cell is judged by: the steady tenant's TTFT p90 on multi_tenant (the
    one the flood must not hurt), else the TTFT p90."""
    return "tenant_a_p90" if scenario == "multi_tenant" else "ttft_p90"


Job = tuple[str, str, float, int, str | None, float | None, int | None]


def _one(args: Job) -> dict[str, Any]:
    """One vsim phase: (scenario, router, rate, seed, configs dir, time scale, requests; None
    = the scenario's own)."""
    sc, router, rate, seed, cfg, ts, requests = args
    name, _, variant = router.partition(":")
    text = None
    if name == "epp" and variant and cfg:
        variant, _, params = variant.partition("?")
        text = (DEFAULT_CONFIG if variant == "default"
                else Path(cfg, f"{variant}.yaml").read_text())
        if params:  # epp:delay?queueWeight=2&stallWeight=0.1 -> the scorer's parameters
            kv = dict(x.split("=") for x in params.split("&"))
            block = "".join(f"\n    {k}: {v}" for k, v in kv.items())
            text = text.replace("- type: delay-cost-scorer\n",
                                f"- type: delay-cost-scorer\n  parameters:{block}\n", 1)
        router = "epp"
    s = run(sc, router, epp_config_text=text, rate=rate, seed=get(sc).seed + seed,
            time_scale=ts, requests=requests)
    return {"sc": sc, "router": args[1], "rate": rate, "seed": seed, **{
        k: s[k] for k in ("ttft_p50", "ttft_p90", "cached_ratio", "goodput", "tpot_p50",
                          "output_throughput")
    }, "tenant_a_p90": s.get("by_tenant", {}).get("tenant-a", {}).get("ttft_p90"),
        "requests": s["sim"]["requests"]}


def add_phase_args(p: argparse.ArgumentParser) -> None:
    """What every phase of an experiment may change from its scenario (`Job`'s last two)."""
    p.add_argument("--time-scale", type=float, default=None,
                   help="EPP clock vs model time (default: the scenario's, like the harness)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per phase (default: the scenario's)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--routers", default="round_robin,cache_aware,epp")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--seeds", default="0,100,200")
    p.add_argument("--configs", default=str(CONFIGS_DIR))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--rate-scales", default="1",
                   help="comma list of factors on each scenario's rates (e.g. 1,1.5 adds "
                   "overload phases)")
    add_phase_args(p)
    a = p.parse_args(argv)
    routers = a.routers.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    scales = [float(x) for x in a.rate_scales.split(",")]
    jobs: list[Job] = [
        (sc, r, rate * k, seed, a.configs, a.time_scale, a.requests)
        for sc in a.scenarios.split(",")
        for k in scales for rate in get(sc).rates for r in routers for seed in seeds]
    jobs.sort(key=lambda j: j[0] == "multi_tenant", reverse=True)  # slowest first
    with ProcessPoolExecutor(a.jobs) as ex:
        rows = list(ex.map(_one, jobs))
    cells: dict[tuple[str, float], dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        cells.setdefault((r["sc"], r["rate"]), {}).setdefault(r["router"], []).append(r)
    wins = {r: 0 for r in routers}
    print("| scenario | rate | " + " | ".join(routers) + " |")
    print("|---|---|" + "---|" * len(routers))
    for (sc, rate), by_router in cells.items():
        key = quality_key(sc)
        med = {}
        out = []
        for r in routers:
            rs = by_router[r]
            vals = [x[key] for x in rs]
            med[r] = statistics.median(vals)
            cached = statistics.median(x["cached_ratio"] for x in rs)
            good = statistics.median(x["goodput"] for x in rs)
            p50 = statistics.median(x["ttft_p50"] for x in rs)
            out.append(f"{med[r]:.3f} [{min(vals):.3f},{max(vals):.3f}] p50 {p50:.3f} c{cached:.2f} g{good:.2f}")
        others = [med[r] for r in routers if not r.startswith("epp")]
        best_other = min(others) if others else float("inf")
        for r in routers:
            if med[r] <= best_other * 1.03:
                wins[r] += 1
        print(f"| {sc} | {rate:g} | " + " | ".join(out) + " |")
    print("wins/ties vs best non-EPP:", wins, "of", len(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
