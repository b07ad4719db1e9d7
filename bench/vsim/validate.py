"""`python -m bench.vsim.validate results.json [...]`: replay a `bench.run` results file in
virtual time and compare, per router and rate, vsim's TTFT p50/p90 (and cached share,
output tok/s) with the harness's, with the % difference, and whether both rank the
routers the same way.

The scenario is rebuilt from the results file itself (pool, workload, rates, requests per
rate, seed), so the schedules are the ones the harness sent.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import orjson

from bench.scenarios import Scenario
from bench.scenarios.workload import WorkloadSpec
from bench.vsim.api import run
from epp.sim.config import SimConfig

KEYS = ("ttft_p50", "ttft_p90")


def scenario_of(data: dict[str, Any]) -> Scenario:
    sc = data["scenario"]
    cfg_fields = {f.name for f in dataclasses.fields(SimConfig)}
    wl_fields = {f.name for f in dataclasses.fields(WorkloadSpec)}
    pool = [SimConfig(**{k: v for k, v in c.items() if k in cfg_fields}) for c in sc["pool"]]
    workload = WorkloadSpec(**{k: v for k, v in sc["workload"].items() if k in wl_fields})
    return Scenario(
        name=sc["name"], description=sc.get("description", ""), pool=pool, workload=workload,
        rates=[float(r) for r in sc["rates"]], requests_per_rate=int(sc["requests_per_rate"]),
        max_phase_s=float(sc.get("max_phase_s") or 0.0), slo_ttft_s=float(sc["slo_ttft_s"]),
        slo_tpot_s=float(sc["slo_tpot_s"]), seed=int(sc.get("seed", 1)),
    )


def _diff(v: float, ref: float) -> float:
    if ref == 0 or math.isnan(ref) or math.isnan(v):
        return math.nan
    return (v - ref) / ref * 100.0


def _median_run(sc: Scenario, router: str, rate: float, seeds: int) -> dict[str, Any]:
    """vsim's figures for one phase: the median over `seeds` router seeds (the routers'
    random tie-breaks decide where the first request of each prefix group lands, and with
    it much of the tail), with the min..max range of TTFT p50/p90 under `range`."""
    runs = [run(sc, router, rate=rate, router_seed=s) for s in range(1, seeds + 1)]
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[len(runs) // 2])
    for key in ("ttft_p50", "ttft_p90", "cached_ratio", "output_throughput", "tpot_p50",
                "goodput", "slo_attainment"):
        vals = sorted(r[key] for r in runs)
        out[key] = vals[len(vals) // 2]
        out.setdefault("range", {})[key] = [vals[0], vals[-1]]
    return out


def compare(
    results: str | Path | dict[str, Any], routers: list[str] | None = None, seeds: int = 5
) -> dict[str, Any]:
    """`results`: a bench.run results.json (path or its parsed content)."""
    data = results if isinstance(results, dict) else orjson.loads(Path(results).read_bytes())
    sc = scenario_of(data)
    rows = []
    for ph in data["phases"]:
        name = ph["router"]
        if routers and name not in routers:
            continue
        h = ph["summary"]
        v = _median_run(sc, name, float(ph["rate"]), seeds)
        rows.append({"router": name, "rate": float(ph["rate"]), "harness": h, "vsim": v})
    return {"scenario": sc.name, "rows": rows, "ranks": rankings(rows)}


def rankings(rows: list[dict[str, Any]], margin: float = 10.0) -> list[dict[str, Any]]:
    """Per rate and key, the routers ordered by the harness and by vsim; `same` checks
    every pair the harness separates by more than `margin` % (closer pairs are ties
    within the harness's own noise)."""
    out = []
    for rate in sorted({r["rate"] for r in rows}):
        at = [r for r in rows if r["rate"] == rate]
        for key in KEYS:
            hs = [r["router"] for r in sorted(at, key=lambda r: r["harness"][key])]
            vs = [r["router"] for r in sorted(at, key=lambda r: r["vsim"][key])]
            flipped = []
            for a in at:
                for b in at:
                    ha, hb = a["harness"][key], b["harness"][key]
                    if ha < hb and (hb - ha) / ha * 100.0 > margin and (
                        a["vsim"][key] >= b["vsim"][key]
                    ):
                        flipped.append(f"{a['router']} < {b['router']}")
            out.append({"rate": rate, "key": key, "harness": hs, "vsim": vs,
                        "same": not flipped, "flipped": flipped})
    return out


def within(rows: list[dict[str, Any]], tolerance: float = 20.0) -> list[str]:
    """Rows whose TTFT p50 or p90 is more than `tolerance` % off the harness's."""
    bad = []
    for r in rows:
        for key in KEYS:
            d = _diff(r["vsim"][key], r["harness"][key])
            if math.isnan(d) or abs(d) > tolerance:
                bad.append(f"{r['router']} @ {r['rate']:g} {key}: vsim {r['vsim'][key]:.3f} "
                           f"harness {r['harness'][key]:.3f} ({d:+.0f}%)")
    return bad


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"**{result['scenario']}**",
        "",
        "vsim: median over router seeds, [min, max] in brackets.",
        "",
        "| router | rate | TTFT p50 harness | vsim | diff | TTFT p90 harness | vsim | diff "
        "| cached harness | vsim | out tok/s harness | vsim |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def rng(v: dict[str, Any], key: str) -> str:
        lo_hi = v.get("range", {}).get(key)
        return f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else ""

    for r in result["rows"]:
        h, v = r["harness"], r["vsim"]
        lines.append(
            f"| {r['router']} | {r['rate']:g} | {h['ttft_p50']:.3f} | {v['ttft_p50']:.3f}"
            f"{rng(v, 'ttft_p50')} | {_diff(v['ttft_p50'], h['ttft_p50']):+.0f}% "
            f"| {h['ttft_p90']:.3f} | {v['ttft_p90']:.3f}{rng(v, 'ttft_p90')} "
            f"| {_diff(v['ttft_p90'], h['ttft_p90']):+.0f}% "
            f"| {h['cached_ratio']:.2f} | {v['cached_ratio']:.2f} "
            f"| {h['output_throughput']:.0f} | {v['output_throughput']:.0f} |"
        )
    lines.append("")
    for k in result["ranks"]:
        mark = "same order" if k["same"] else "flipped: " + "; ".join(k["flipped"])
        lines.append(f"- rate {k['rate']:g}, {k['key']}: harness "
                     f"{' < '.join(k['harness'])}; vsim {' < '.join(k['vsim'])} ({mark})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vsim.validate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="bench.run results.json files")
    p.add_argument("--routers", default="", help="only these routers (comma list; default all)")
    p.add_argument("--tolerance", type=float, default=20.0,
                   help="allowed TTFT p50/p90 difference in %% (default 20)")
    p.add_argument("--seeds", type=int, default=5,
                   help="router seeds per phase; vsim reports the median (default 5)")
    args = p.parse_args(argv)
    routers = [r for r in args.routers.split(",") if r] or None
    failed = 0
    for path in args.results:
        res = compare(path, routers, args.seeds)
        print(markdown(res))
        bad = within(res["rows"], args.tolerance)
        for b in bad:
            print(f"  outside {args.tolerance:g}%: {b}")
        failed += len(bad) + sum(1 for k in res["ranks"] if not k["same"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
