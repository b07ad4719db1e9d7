"""`python -m bench.vsim scale SCENARIO`: every router on pools of growing size, same load
per pod, same prefix groups per pod -> TTFT p90, cached share, goodput and output tok/s vs
pool size, with plots, in bench/results/vsim_scale_<scenario>/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench.scenarios import SCENARIOS, get
from bench.vsim.api import run

RESULTS = Path(__file__).resolve().parents[1] / "results"
ROUTERS = "round_robin,least_loaded,power_of_two,cache_aware,epp"
KEYS = (("ttft_p90", "TTFT p90 (s)", True), ("cached_ratio", "cached-token share", False),
        ("goodput", "goodput (SLO-meeting req/s)", False),
        ("output_throughput", "output tokens/s", False))


def study(
    scenario: str, sizes: list[int], routers: list[str], *, requests_per_pod: int,
    max_requests: int, load: float, seed: int | None = None,
) -> dict[str, Any]:
    sc = get(scenario)
    base = len(sc.pool)
    rows = []
    for n in sizes:
        rate = sc.rates[-1] * load * n / base
        count = min(max_requests, requests_per_pod * n)
        for router in routers:
            t0 = time.perf_counter()
            s = run(sc, router, pool_size=n, requests=count, rate=rate, seed=seed)
            wall = time.perf_counter() - t0
            s.pop("served_by_header", None)
            rows.append({"pods": n, "router": router, "rate": rate, "requests": count,
                         "wall_s": wall, "summary": s})
            print(f"{scenario} {n:4d} pods {router:>14}: TTFT p90 {s['ttft_p90']:.3f} "
                  f"cached {s['cached_ratio']:.2f} goodput {s['goodput']:.1f} "
                  f"out {s['output_throughput']:.0f} tok/s ({wall:.0f} s wall, "
                  f"{s['sim']['cpu_s']:.0f} s CPU)", flush=True)
    return {"scenario": scenario, "sizes": sizes, "routers": routers, "load": load,
            "requests_per_pod": requests_per_pod, "rows": rows}


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "| pods | router | req/s | requests | TTFT p50 | TTFT p90 | cached | goodput "
        "| out tok/s | pods/group | busiest pod share |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        s = r["summary"]
        d = s["decisions"]
        lines.append(
            f"| {r['pods']} | {r['router']} | {r['rate']:g} | {r['requests']} "
            f"| {s['ttft_p50']:.3f} | {s['ttft_p90']:.3f} | {s['cached_ratio']:.2f} "
            f"| {s['goodput']:.1f} | {s['output_throughput']:.0f} "
            f"| {d['pods_per_group_mean']:.2f} | {d['busiest_pod_share']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KEYS), figsize=(5 * len(KEYS), 4.2))
    for ax, (key, title, log) in zip(axes, KEYS, strict=True):
        for router in data["routers"]:
            pts = [(r["pods"], r["summary"][key]) for r in data["rows"] if r["router"] == router]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=router)
        ax.set_xscale("log", base=2)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("pods")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{data['scenario']}: routers vs pool size (vsim, same load per pod)")
    fig.tight_layout()
    path = out / "scale.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vsim scale", description=__doc__)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--sizes", default="4,16,64,256", help="pool sizes (default 4,16,64,256)")
    p.add_argument("--routers", default=ROUTERS, help=f"comma list (default {ROUTERS})")
    p.add_argument("--requests-per-pod", type=int, default=100,
                   help="requests per pod per run (default 100)")
    p.add_argument("--max-requests", type=int, default=100_000,
                   help="cap on requests per run (default 100000)")
    p.add_argument("--load", type=float, default=1.0,
                   help="fraction of the scenario's highest rate per 4 pods (default 1.0)")
    p.add_argument("--out", default="", help="folder (default bench/results/vsim_scale_<sc>)")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    routers = [r for r in args.routers.split(",") if r]
    data = study(args.scenario, sizes, routers, requests_per_pod=args.requests_per_pod,
                 max_requests=args.max_requests, load=args.load)
    out = Path(args.out) if args.out else RESULTS / f"vsim_scale_{args.scenario}"
    out.mkdir(parents=True, exist_ok=True)
    data["command"] = "python -m bench.vsim scale " + " ".join(argv or sys.argv[2:])
    (out / "results.json").write_bytes(
        orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY,
                     default=str))
    (out / "results.md").write_text(markdown(data))
    plot(data, out)
    print(markdown(data))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
