"""bench.proxy's interleaved rounds: every setup measured once per round, each round starting
one setup later, and medians / intervals / per-round ratios computed from those rounds
(`wrk` replaced by a stand-in that returns a figure per setup and round)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from bench import proxy

RPS = {"plain": 1000.0, "epp": 600.0, "null_extproc": 800.0, "vllm-router:cache_aware": 750.0}
P50 = {"plain": 0.5, "epp": 2.5, "null_extproc": 2.0, "vllm-router:cache_aware": 1.5}


def test_rounds_interleave_and_summarise(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    targets = {name: f"http://{name}/v1/completions" for name in RPS}
    url_to_name = {url: name for name, url in targets.items()}
    calls: list[tuple[str, int]] = []
    seen: dict[str, int] = {}

    def fake_wrk(url: str, body: Path, script: Path, conns: int, duration: float) -> dict[str, Any]:
        name = url_to_name[url]
        if conns == 4:  # warm-up
            return {"rps": 0.0, "p50_ms": 0.0, "non2xx": 0.0}
        calls.append((name, conns))
        k = seen[name] = seen.get(name, 0) + 1
        # the EPP's third round is slow: the median must not move with it
        slow = 0.5 if (name == "epp" and k == 3) else 1.0
        return {"rps": RPS[name] * slow, "p50_ms": P50[name], "non2xx": 0.0}

    monkeypatch.setattr(proxy, "wrk", fake_wrk)
    args = argparse.Namespace(
        duration=1.0, connections=32, rounds=4, epp_processes=1, workers=1, sync=True,
        response_headers=True, body_mode="FULL_DUPLEX_STREAMED", access_log=False,
    )  # fmt: skip
    small, large, script = tmp_path / "s", tmp_path / "l", tmp_path / "w"
    out = proxy._measure_all(
        args, targets, {"sglang": {"skipped": "no binary"}}, small, large, script
    )

    full = [name for name, conns in calls if conns == 32]
    names = list(targets)
    assert full == [n for r in range(4) for n in names[r:] + names[:r]]
    assert out["rounds"] == 4
    assert out["machine_loop_ms"] > 0.0
    assert out["epp_rps"] == 600.0  # median of 600, 600, 300, 600
    assert out["epp_rps_rounds"] == [600.0, 600.0, 300.0, 600.0]
    assert out["ratio"] == 0.6
    assert out["added_p50_ms_c1"] == 2.0
    peer = out["peers"]["vllm-router:cache_aware"]
    assert peer["epp_rps_over_this"] == 0.8
    lo, hi = peer["epp_rps_over_this_ci95"]
    assert lo <= 0.8 <= hi and lo >= 0.4
    assert out["null_extproc"]["epp_rps_over_this"] == 0.75
    assert out["peers"]["sglang"] == {"skipped": "no binary"}
