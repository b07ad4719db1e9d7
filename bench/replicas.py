"""Active-active EPP replicas: routing quality with 1, 2 and 4 EPPs behind one Envoy, sharing
state (sync on) or not (independent replicas, the ecosystem's active-active today).

    python -m bench.replicas [--scenarios shared_prefix,bursts] [--replicas 1,2,4] [--quick]
    python -m bench.replicas --report-only          # table + plot from the last runs

Each scenario runs through `bench.run` with routers `epp`, `epp@N` and `epp@N-nosync`
(Envoy spreads the ext_proc streams over the replicas, least-request) into
bench/results/replicas/<scenario>/; the summary (cached share and TTFT p90 per replica
count, relative to one instance) goes to bench/results/replicas/summary.md and
replicas.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from bench import terminable
from bench.routers import RouterSpec
from bench.run import RESULTS, run_scenario
from bench.scenarios import get

OUT = RESULTS / "replicas"
WITHIN = 0.05  # the target: sync on keeps cached share and TTFT p90 within 5% of one EPP


def routers_for(replicas: list[int]) -> list[str]:
    out = []
    for n in replicas:
        out += ["epp"] if n == 1 else [f"epp@{n}", f"epp@{n}-nosync"]
    return out


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per router x rate, with the change against one EPP at the same rate."""
    base = {p["rate"]: p["summary"] for p in results["phases"] if p["router"] == "epp"}
    out = []
    for p in results["phases"]:
        spec = RouterSpec.parse(p["router"])
        if spec.kind != "epp":
            continue
        s, b = p["summary"], base.get(p["rate"])
        row: dict[str, Any] = {
            "router": p["router"],
            "replicas": spec.replicas,
            "sync": spec.sync,
            "rate": p["rate"],
            "completed": s["completed"],
            "errors": s["errors"],
            "cached": s["cached_ratio"],
            "ttft_p90": s["ttft_p90"],
            "ttft_p50": s["ttft_p50"],
        }
        if b and b["cached_ratio"] and b["ttft_p90"]:
            row["d_cached"] = s["cached_ratio"] / b["cached_ratio"] - 1
            row["d_ttft_p90"] = s["ttft_p90"] / b["ttft_p90"] - 1
        out.append(row)
    return sorted(out, key=lambda r: (r["rate"], r["replicas"], not r["sync"]))


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:+.1f}%"


def summary_md(tables: dict[str, list[dict[str, Any]]], commands: dict[str, str]) -> str:
    lines = ["# EPP replicas: 1 vs N behind one Envoy, state sync on / off", ""]
    for scenario, table in tables.items():
        lines += [f"## {scenario}", "", f"`{commands.get(scenario, '')}`", ""]
        lines += ["| rate | replicas | sync | done | errors | cached | Δ cached | TTFT p50 | "
                  "TTFT p90 | Δ TTFT p90 | within 5% |", "|" + "---|" * 11]
        for r in table:
            within = ""
            if "d_cached" in r and r["replicas"] > 1:
                ok = r["d_cached"] >= -WITHIN and r["d_ttft_p90"] <= WITHIN
                within = "yes" if ok else "no"
            lines.append(
                f"| {r['rate']:g} | {r['replicas']} | {'on' if r['sync'] else 'off'} | "
                f"{r['completed']} | {r['errors']} | {r['cached']:.3f} | "
                f"{_pct(r.get('d_cached'))} | {r['ttft_p50']:.3f} | {r['ttft_p90']:.3f} | "
                f"{_pct(r.get('d_ttft_p90'))} | {within} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(tables: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(tables), figsize=(5 * len(tables), 7), squeeze=False)
    for col, (scenario, table) in enumerate(tables.items()):
        top = max((r["rate"] for r in table), default=0)
        at_top = [r for r in table if r["rate"] == top]
        for sync, style in ((True, "o-"), (False, "s--")):
            pts = sorted(
                ((r["replicas"], r) for r in at_top if r["replicas"] == 1 or r["sync"] == sync),
                key=lambda t: t[0],
            )
            label = "sync on" if sync else "sync off"
            xs = [n for n, _ in pts]
            axes[0][col].plot(xs, [r["cached"] for _, r in pts], style, label=label)
            axes[1][col].plot(xs, [r["ttft_p90"] for _, r in pts], style, label=label)
        axes[0][col].set_title(f"{scenario} @ {top:g} req/s")
        axes[0][col].set_ylabel("cached prompt share")
        axes[1][col].set_ylabel("TTFT p90 (s, model time)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("EPP replicas")
            ax.set_xticks(sorted({r["replicas"] for r in table}))
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__)
    p.add_argument("--scenarios", default="shared_prefix,bursts",
                   help="comma list (default: shared_prefix,bursts)")
    p.add_argument("--replicas", default="1,2,4", help="EPP counts (default: 1,2,4)")
    p.add_argument("--quick", action="store_true", help="the scenarios' quick variant")
    p.add_argument("--rates", default="", help="override the load sweep (default: scenario's)")
    p.add_argument("--requests", type=int, default=0, help="requests per rate (default: scenario's)")
    p.add_argument("--out", default=str(OUT), help=f"output folder (default: {OUT})")
    p.add_argument("--report-only", action="store_true", help="summarise the last runs only")
    a = p.parse_args(argv)
    out = Path(a.out)
    scenarios = [s for s in a.scenarios.split(",") if s]
    routers = routers_for([int(x) for x in a.replicas.split(",")])
    command = "python -m bench.replicas " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    for name in scenarios if not a.report_only else []:
        sc = get(name)
        if a.quick:
            sc = sc.quick()
        if a.rates:
            sc = dataclasses.replace(sc, rates=[float(x) for x in a.rates.split(",")])
        if a.requests:
            sc = dataclasses.replace(sc, requests_per_rate=a.requests)
        terminable.run(run_scenario(sc, routers, out / name, command=command))
    tables, commands = {}, {}
    for name in scenarios:
        path = out / name / "results.json"
        if not path.exists():
            print(f"no results for {name} in {path}", file=sys.stderr)
            continue
        data = json.loads(path.read_text())
        tables[name] = rows(data)
        commands[name] = data.get("command", "")
    if not tables:
        return 1
    (out / "summary.md").write_text(summary_md(tables, commands))
    (out / "summary.json").write_text(json.dumps(tables, indent=1))
    plot(tables, out / "replicas.png")
    print(f"wrote {out}/summary.md and replicas.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
