"""The inference-perf config for a bench scenario (pure: a dict, written as YAML).

Rates are given in model time like `bench.run` (requests per model second); inference-perf
runs in wall time, so its stage rate is `rate / time_scale` and its latencies come back
x `time_scale` (the summary divides them again). Only shared-prefix workloads map onto
inference-perf's `shared_prefix` generator; others raise ValueError.

inference-perf builds `num_groups x num_prompts_per_group` prompts once, shuffles them and
cycles through them. `bench.run` sends a fresh question with every request, so by default
(`unique_questions`) there are enough prompts per group that none repeats within the run;
otherwise the scenario's `users_per_group` prompts repeat (whole prompts hit the cache).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.scenarios import Scenario


def iperf_config(
    sc: Scenario,
    *,
    url: str,
    tokenizer_dir: Path,
    report_dir: Path,
    rates: Sequence[float],
    stage_s: int,
    model: str | None = None,
    num_workers: int = 1,
    request_timeout_s: float = 60.0,
    grace_s: float = 10.0,
    unique_questions: bool = True,
) -> dict[str, Any]:
    w = sc.workload
    if w.kind != "shared_prefix":
        raise ValueError(f"scenario {sc.name!r} has a {w.kind!r} workload; only shared_prefix "
                         "maps onto inference-perf's generator")
    if stage_s <= 0 or not rates or any(r <= 0 for r in rates):
        raise ValueError("need positive rates and stage duration")
    scale = sc.time_scale
    wall_rates = [round(r / scale, 4) for r in rates]
    per_group = w.users_per_group
    if unique_questions:
        total = sum(math.ceil(r * stage_s) for r in wall_rates)
        per_group = max(per_group, math.ceil(total / w.groups))
    return {
        "api": {"type": "completion", "streaming": True},
        "server": {
            "type": "vllm",
            "model_name": model or sc.pool[0].model,
            "base_url": url.rstrip("/"),
            "ignore_eos": True,
        },
        "tokenizer": {"pretrained_model_name_or_path": str(tokenizer_dir), "load_timeout": 60},
        "data": {
            "type": "shared_prefix",
            "shared_prefix": {
                "num_groups": w.groups,
                "num_prompts_per_group": per_group,
                "system_prompt_len": w.system_tokens,
                "question_len": w.question_tokens,
                "output_len": w.output_tokens,
                "seed": sc.seed,
            },
        },
        "load": {
            # Open-loop Poisson arrivals, like bench.run's schedules.
            "type": "poisson",
            "stages": [{"rate": r, "duration": int(stage_s)} for r in wall_rates],
            "interval": 1.0,
            "num_workers": num_workers,
            "worker_max_concurrency": 100,
            "request_timeout": request_timeout_s,
            "stage_teardown_grace_seconds": grace_s,
            "base_seed": sc.seed,
        },
        "report": {
            "request_lifecycle": {"summary": True, "per_stage": True, "per_request": False},
            # The scenario's SLOs, in wall time.
            "goodput": {"constraints": {"ttft": sc.slo_ttft_s * scale,
                                        "tpot": sc.slo_tpot_s * scale}},
        },
        "storage": {"local_storage": {"path": str(report_dir)}},
    }


def wall_bound_s(cfg: dict[str, Any], startup_s: float = 90.0) -> float:
    """Upper bound on one inference-perf run: stages + gaps + teardown grace + start-up."""
    load = cfg["load"]
    stages = load["stages"]
    return float(sum(s["duration"] for s in stages) + load["interval"] * len(stages)
            + load["stage_teardown_grace_seconds"] * len(stages) + startup_s)


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
