"""bench.iperf: scenario -> inference-perf config, report parsing, and (when the separate
Python 3.12 venv exists) a real short run against plain Envoy round-robin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.iperf.config import iperf_config, wall_bound_s
from bench.iperf.env import DEFAULT_VENV, IperfEnv
from bench.iperf.run import main as iperf_main
from bench.iperf.summary import markdown, read_reports
from bench.scenarios import get


def _cfg(**kw: object) -> dict[str, object]:
    return iperf_config(get("shared_prefix"), url="http://127.0.0.1:1/", tokenizer_dir=Path("/t"),
                        report_dir=Path("/r"), **kw)  # type: ignore[arg-type]


def test_config_maps_model_rates_to_wall_stages_and_workload() -> None:
    cfg = _cfg(rates=[4.0, 8.0], stage_s=20)
    load = cfg["load"]
    assert isinstance(load, dict)
    # shared_prefix runs at time scale 2: model 4, 8 req/s are 2, 4 req/s on the wall.
    assert [s["rate"] for s in load["stages"]] == [2.0, 4.0]
    assert load["type"] == "poisson"
    sp = cfg["data"]["shared_prefix"]  # type: ignore[index]
    assert (sp["num_groups"], sp["system_prompt_len"], sp["question_len"], sp["output_len"]) == (
        8, 2000, 60, 32)
    # 40 + 80 requests over 8 groups: 15 prompts per group, so no prompt repeats.
    assert sp["num_prompts_per_group"] == 15
    assert cfg["server"]["base_url"] == "http://127.0.0.1:1"  # type: ignore[index]
    assert wall_bound_s(cfg) >= 40 + 2 * 10


def test_config_cycled_prompts_and_rejections() -> None:
    sp = _cfg(rates=[4.0], stage_s=20, unique_questions=False)["data"]["shared_prefix"]  # type: ignore[index]
    assert sp["num_prompts_per_group"] == 4
    with pytest.raises(ValueError, match="shared_prefix"):
        iperf_config(get("mixed"), url="u", tokenizer_dir=Path("/t"), report_dir=Path("/r"),
                     rates=[1.0], stage_s=5)
    with pytest.raises(ValueError):
        _cfg(rates=[0.0], stage_s=5)


def _stage(p90: float, cached: float) -> dict[str, object]:
    dist = {"median": p90 / 2, "p90": p90, "p99": p90 * 2}
    return {
        "load_summary": {"requested_rate": 2.0, "achieved_rate": 1.9},
        "successes": {
            "count": 10,
            "latency": {"time_to_first_token": dist, "time_per_output_token": dist,
                        "request_latency": dist},
            "throughput": {"output_tokens_per_sec": 60.0, "requests_per_sec": 1.9},
            "prompt_tokens": {"total": 1000.0, "cached": cached, "mean": 100.0},
        },
        "failures": {"count": 1},
    }


def test_summary_reads_stage_reports_in_model_time(tmp_path: Path) -> None:
    (tmp_path / "stage_1_lifecycle_metrics.json").write_text(json.dumps(_stage(0.8, 500.0)))
    (tmp_path / "stage_0_lifecycle_metrics.json").write_text(json.dumps(_stage(0.4, 250.0)))
    out = read_reports(tmp_path, time_scale=2.0)
    s0, s1 = out["stages"]
    assert s0["ttft_p90_model_s"] == pytest.approx(0.2)  # wall 0.4 s at scale 2
    assert s0["ttft_p50_wall_s"] == pytest.approx(0.2)
    assert s1["ttft_p90_model_s"] == pytest.approx(0.4)
    assert (s0["cached_ratio"], s1["cached_ratio"]) == (0.25, 0.5)
    assert (s0["completed"], s0["failed"]) == (10, 1)
    table = markdown([{"router": "rr", **out, "per_pod": {"a": 6, "b": 5}}])
    assert "| rr | 0 |" in table and "| rr | 1 |" in table and "6/5" in table


@pytest.mark.integration
@pytest.mark.skipif(not IperfEnv(DEFAULT_VENV).ready(),
                    reason="no .venv-iperf (python -m bench.iperf.env needs network installs)")
def test_inference_perf_drives_round_robin(tmp_path: Path) -> None:
    rc = iperf_main(["--scenario", "tiny", "--routers", "round_robin", "--rates", "8",
                     "--stage-s", "3", "--sim-base-ip", "127.0.7.20", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "summary.json").read_text())
    (run,) = doc["runs"]
    assert "error" not in run
    (stage,) = run["stages"]
    assert stage["completed"] >= 20 and stage["failed"] == 0
    assert stage["ttft_p90_model_s"] is not None
    assert sum(run["per_pod"].values()) >= stage["completed"]
    assert (tmp_path / "round_robin" / "stage_0_lifecycle_metrics.json").exists()
