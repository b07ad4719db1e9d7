"""Read inference-perf's report files back and condense them (pure, no I/O but reading).

inference-perf writes `stage_<i>_lifecycle_metrics.json` and `summary_lifecycle_metrics.json`
into its local storage path. Latencies there are wall seconds; `time_scale` converts them
to the model time `bench.run` reports use.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_STAGE = re.compile(r"stage_(\d+)_lifecycle_metrics\.json$")


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) else None


def _ratio(a: Any, b: Any) -> float | None:
    x, y = _num(a), _num(b)
    return x / y if x is not None and y else None


def condense(contents: dict[str, Any], time_scale: float) -> dict[str, Any]:
    """One stage (or the whole-run summary) as a flat row; latencies in model seconds."""
    ok = _get(contents, "successes") or {}
    lat = ok.get("latency") or {}
    thr = ok.get("throughput") or {}
    failures = _num(_get(contents, "failures", "count")) or 0.0
    row: dict[str, Any] = {
        "requested_rate": _num(_get(contents, "load_summary", "requested_rate")),
        "achieved_rate": _num(_get(contents, "load_summary", "achieved_rate")),
        "completed": int(_num(ok.get("count")) or 0),
        "failed": int(failures),
        "output_tok_s_wall": _num(thr.get("output_tokens_per_sec")),
        "requests_s_wall": _num(thr.get("requests_per_sec")),
        "prompt_tokens_mean": _num(_get(ok, "prompt_tokens", "mean")),
        "cached_ratio": _ratio(_get(ok, "prompt_tokens", "cached"),
                               _get(ok, "prompt_tokens", "total")),
        "goodput_pct": _num(_get(ok, "goodput_metrics", "goodput_percentage")),
    }
    for name, key in (("ttft", "time_to_first_token"), ("tpot", "time_per_output_token"),
                      ("e2e", "request_latency")):
        for p, field in (("p50", "median"), ("p90", "p90"), ("p99", "p99")):
            v = _num(_get(lat, key, field))
            row[f"{name}_{p}_wall_s"] = v
            row[f"{name}_{p}_model_s"] = None if v is None else v / time_scale
    return row


def read_reports(report_dir: Path, time_scale: float) -> dict[str, Any]:
    stages: list[tuple[int, dict[str, Any]]] = []
    for p in report_dir.glob("*.json"):
        m = _STAGE.search(p.name)
        if m:
            stages.append((int(m.group(1)), condense(json.loads(p.read_text()), time_scale)))
    out: dict[str, Any] = {"stages": [row for _, row in sorted(stages, key=lambda s: s[0])]}
    summary = report_dir / "summary_lifecycle_metrics.json"
    if summary.exists():
        out["summary"] = condense(json.loads(summary.read_text()), time_scale)
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(runs: list[dict[str, Any]]) -> str:
    """A table: one row per router x stage. TTFT/TPOT in model seconds."""
    head = ("| router | stage | req/s (wall, asked/achieved) | done | failed | TTFT p50 | "
            "TTFT p90 | TPOT p50 | E2E p90 | out tok/s (wall) | prompt tok | cached | "
            "goodput % | pod requests |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in runs:
        pods = run.get("per_pod") or {}
        pod_txt = "/".join(str(v) for v in pods.values()) if pods else "-"
        for i, s in enumerate(run.get("stages", [])):
            lines.append(
                f"| {run['router']} | {i} | {_fmt(s['requested_rate'], 2)}/"
                f"{_fmt(s['achieved_rate'], 2)} | {s['completed']} | {s['failed']} | "
                f"{_fmt(s['ttft_p50_model_s'])} | {_fmt(s['ttft_p90_model_s'])} | "
                f"{_fmt(s['tpot_p50_model_s'], 4)} | {_fmt(s['e2e_p90_model_s'])} | "
                f"{_fmt(s['output_tok_s_wall'], 1)} | {_fmt(s['prompt_tokens_mean'], 0)} | "
                f"{_fmt(s['cached_ratio'], 2)} | {_fmt(s['goodput_pct'], 1)} | "
                f"{pod_txt if i == 0 else ''} |"
            )
        if run.get("error"):
            lines.append(f"| {run['router']} | - | failed: {run['error']} |" + " |" * 11)
    return "\n".join(lines) + "\n"
