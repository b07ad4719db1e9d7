"""Summaries of benchmark phases and the report files: results.json, results.md, PNG plots."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from bench.scenarios.driver import Result


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    pos = q / 100 * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def bootstrap_ci(
    values: Sequence[float], q: float, *, iterations: int = 1000, seed: int = 1,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the `q`th percentile (seeded)."""
    n = len(values)
    if n < 2:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    s = list(values)
    stats = sorted(
        percentile([s[rng.randrange(n)] for _ in range(n)], q) for _ in range(iterations)
    )
    lo = stats[int((1 - level) / 2 * (iterations - 1))]
    hi = stats[int((1 + level) / 2 * (iterations - 1))]
    return (lo, hi)


def summarize(
    results: Sequence[Result], *, wall_s: float, time_scale: float, slo_ttft_s: float,
    slo_tpot_s: float, scheduled: int, per_tenant: bool = True,
) -> dict[str, Any]:
    """Latencies and throughputs in model time (wall / time_scale)."""
    k = 1.0 / time_scale
    ok = [r for r in results if r.ok]
    out: dict[str, Any] = {
        "scheduled": scheduled,
        "sent": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": sorted({f"{r.status} {r.error}"[:120] for r in results if not r.ok})[:5],
        "duration_s": wall_s * k,
    }
    metrics = {
        "ttft": [r.ttft * k for r in ok],
        "tpot": [r.tpot * k for r in ok if r.output_tokens > 1],
        "itl": [x * k for r in ok for x in r.itls],
        "e2e": [r.e2e * k for r in ok],
    }
    for name, vals in metrics.items():
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = percentile(vals, q)
        out[f"{name}_mean"] = sum(vals) / len(vals) if vals else math.nan
    for q in (50, 90):
        out[f"ttft_p{q}_ci"] = list(bootstrap_ci(metrics["ttft"], q))
    dur = wall_s * k if wall_s > 0 else math.nan
    out["request_throughput"] = len(ok) / dur
    out["output_throughput"] = sum(r.output_tokens for r in ok) / dur
    prompt = sum(r.prompt_tokens for r in ok)
    out["cached_ratio"] = sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0
    good = [
        r for r in ok
        if r.ttft * k <= slo_ttft_s and (r.output_tokens <= 1 or r.tpot * k <= slo_tpot_s)
    ]
    out["slo_attainment"] = len(good) / len(results) if results else 0.0
    out["goodput"] = len(good) / dur  # SLO-meeting requests per (model) second
    served: dict[str, int] = {}
    for r in results:
        if r.server:
            served[r.server] = served.get(r.server, 0) + 1
    out["served_by_header"] = served
    pd_modes: dict[str, int] = {}
    for r in results:
        if r.pd_mode:
            pd_modes[r.pd_mode] = pd_modes.get(r.pd_mode, 0) + 1
    if pd_modes:  # P/D sidecars answered: how many requests were prefilled remotely
        out["pd_modes"] = pd_modes
    tenants = sorted({r.tenant for r in results if r.tenant})
    if tenants and per_tenant:
        out["by_tenant"] = {
            t: summarize(
                [r for r in results if r.tenant == t], wall_s=wall_s, time_scale=time_scale,
                slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s,
                scheduled=sum(1 for r in results if r.tenant == t), per_tenant=False,
            )
            for t in tenants
        }
    return out


def _ci(s: dict[str, Any], key: str) -> str:
    ci = s.get(f"{key}_ci")
    if not ci or any(isinstance(v, float) and math.isnan(v) for v in ci):
        return _fmt(s[key])
    return f"{_fmt(s[key])} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}f}"
    return str(v)


def write_markdown(path: Path, data: dict[str, Any]) -> None:
    sc = data["scenario"]
    lines = [
        f"# {sc['name']}",
        "",
        sc["description"],
        "",
        f"Command: `{data['command']}`  ",
        f"Pool: {len(sc['pool'])} simulated pods, time_scale {sc['time_scale']} "
        f"(figures below are model time: wall / time_scale). Seed {sc['seed']}; "
        f"SLO: TTFT <= {sc['slo_ttft_s']} s, TPOT <= {sc['slo_tpot_s']} s.",
        "",
        "TTFT p50/p90 with a 95% bootstrap confidence interval in brackets. Goodput: "
        "requests meeting both SLOs per model second.",
        "",
        "| router | rate (req/s) | done/sent | err | TTFT p50 | TTFT p90 | TTFT p99 | "
        "TPOT p50 | TPOT p90 | ITL p90 | E2E p90 | req/s | out tok/s | cached | SLO | goodput |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ph in data["phases"]:
        s = ph["summary"]
        lines.append(
            f"| {ph['router']} | {ph['rate']:g} | {s['completed']}/{s['sent']} | {s['errors']} "
            f"| {_ci(s, 'ttft_p50')} | {_ci(s, 'ttft_p90')} | {_fmt(s['ttft_p99'])} "
            f"| {_fmt(s['tpot_p50'], 4)} | {_fmt(s['tpot_p90'], 4)} | {_fmt(s['itl_p90'], 4)} "
            f"| {_fmt(s['e2e_p90'])} | {_fmt(s['request_throughput'], 2)} "
            f"| {_fmt(s['output_throughput'], 1)} | {_fmt(s['cached_ratio'], 2)} "
            f"| {_fmt(s['slo_attainment'], 2)} | {_fmt(s.get('goodput', math.nan), 2)} |"
        )
    for rate, o in data.get("oracle", {}).items():
        lines.append(
            f"| oracle (computed) | {float(rate):g} | - | - | {_fmt(o['ttft_p50'])} "
            f"| {_fmt(o['ttft_p90'])} | {_fmt(o['ttft_p99'])} | {_fmt(o['tpot_floor'], 4)} | - "
            f"| - | - | {_fmt(o['request_throughput'], 2)} | {_fmt(o['output_throughput'], 1)} "
            f"| {_fmt(o['cached_ratio'], 2)} | - | - |"
        )
    tenant_rows = [
        (ph, t, ts) for ph in data["phases"] for t, ts in ph["summary"].get("by_tenant", {}).items()
    ]
    if tenant_rows:
        lines += [
            "", "Per tenant:", "",
            "| router | rate | tenant | done/sent | TTFT p50 | TTFT p90 | TPOT p50 | SLO | goodput |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for ph, t, ts in tenant_rows:
            lines.append(
                f"| {ph['router']} | {ph['rate']:g} | {t} | {ts['completed']}/{ts['sent']} "
                f"| {_ci(ts, 'ttft_p50')} | {_ci(ts, 'ttft_p90')} | {_fmt(ts['tpot_p50'], 4)} "
                f"| {_fmt(ts['slo_attainment'], 2)} | {_fmt(ts['goodput'], 2)} |"
            )
    cost_rows = [ph for ph in data["phases"] if "pod_cost" in ph]
    if cost_rows:
        lines += ["", "Summed pod cost (requests served x the pod's `cost` label):", ""]
        lines += [f"- {ph['router']} @ {ph['rate']:g}: {ph['pod_cost']:.1f}" for ph in cost_rows]
    if data.get("skipped"):
        lines += ["", "Skipped routers:", ""]
        lines += [f"- `{name}`: {why.splitlines()[0]}" for name, why in data["skipped"].items()]
    lines += ["", "Requests per pod (from the simulators):", ""]
    for ph in data["phases"]:
        per_pod = ", ".join(f"{k}={v}" for k, v in sorted(ph.get("per_pod", {}).items()))
        lines.append(f"- {ph['router']} @ {ph['rate']:g}: {per_pod}")
    lines += ["", "Plots: `latency_vs_load.png`, `throughput_vs_load.png`, `pod_load.png`.", ""]
    path.write_text("\n".join(lines))


def write_plots(out: Path, data: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routers = list(dict.fromkeys(ph["router"] for ph in data["phases"]))
    oracle = {float(k): v for k, v in data.get("oracle", {}).items()}
    rates = sorted(oracle)
    files = []

    def series(router: str, key: str) -> tuple[list[float], list[float]]:
        pts = sorted((ph["rate"], ph["summary"][key]) for ph in data["phases"]
                     if ph["router"] == router)
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in zip(axes, ("ttft_p90", "ttft_p50", "tpot_p90"),
                              ("TTFT p90 (s)", "TTFT p50 (s)", "TPOT p90 (s)"), strict=True):
        for r in routers:
            xs, ys = series(r, key)
            ax.plot(xs, ys, marker="o", label=r)
        okey = {"ttft_p90": "ttft_p90", "ttft_p50": "ttft_p50", "tpot_p90": "tpot_floor"}[key]
        if rates:
            ax.plot(rates, [oracle[x][okey] for x in rates], "k--", label="oracle")
        ax.set_xlabel("offered load (req/s)")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{data['scenario']['name']}: latency vs load")
    fig.tight_layout()
    files.append(out / "latency_vs_load.png")
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in zip(axes, ("output_throughput", "cached_ratio"),
                              ("output tokens/s", "cached-token ratio"), strict=True):
        for r in routers:
            xs, ys = series(r, key)
            ax.plot(xs, ys, marker="o", label=r)
        if rates:
            ax.plot(rates, [oracle[x][key] for x in rates], "k--", label="oracle")
        ax.set_xlabel("offered load (req/s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{data['scenario']['name']}: throughput vs load")
    fig.tight_layout()
    files.append(out / "throughput_vs_load.png")
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)

    # Per-pod load over time, highest-rate phase of each router.
    top: dict[str, dict[str, Any]] = {}
    for ph in data["phases"]:
        if ph["router"] not in top or ph["rate"] > top[ph["router"]]["rate"]:
            top[ph["router"]] = ph
    n = max(1, len(top))
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.6 * n), squeeze=False)
    scale = float(data["scenario"]["time_scale"])
    for ax, (router, ph) in zip(axes[:, 0], top.items(), strict=False):
        pods: dict[str, tuple[list[float], list[float]]] = {}
        for s in ph.get("pod_samples", []):
            xs, ys = pods.setdefault(s["pod"], ([], []))
            xs.append(s["t"] / scale)
            ys.append(s["running"] + s["waiting"])
        for pod, (xs, ys) in sorted(pods.items()):
            ax.plot(xs, ys, label=pod, linewidth=1)
        ax.set_title(f"{router} @ {ph['rate']:g} req/s: running + waiting per pod")
        ax.set_ylabel("requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("time (model s)")
    fig.tight_layout()
    files.append(out / "pod_load.png")
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)
    return files


def write_all(out: Path, data: dict[str, Any]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_bytes(
        orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    write_markdown(out / "results.md", data)
    return [out / "results.json", out / "results.md", *write_plots(out, data)]
