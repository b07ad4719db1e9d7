"""Smoke: the runner drives a tiny scenario through plain Envoy round-robin and writes its
report. Asserts the harness works, not figures."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.run import main


def test_tiny_round_robin_writes_report(tmp_path: Path) -> None:
    rc = main([
        "tiny", "--routers", "round_robin,oracle", "--out", str(tmp_path),
        "--sim-base-ip", "127.0.5.2", "--sim-port", "18190", "--router-port", "18195",
        "--requests", "12", "--max-phase-s", "10",
    ])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    (phase,) = data["phases"]
    s = phase["summary"]
    assert phase["router"] == "round_robin"
    assert s["sent"] == 12 and s["completed"] == 12 and s["errors"] == 0
    # Round-robin spreads requests over both pods; each answered with x-sim-server.
    assert set(s["served_by_header"]) == {"127.0.5.2:18190", "127.0.5.3:18190"}
    assert sum(phase["per_pod"].values()) >= 12
    rows = [json.loads(line) for line in (tmp_path / "raw" / "round_robin@20.jsonl").open()]
    assert len(rows) == 12 and all(r["ok"] and r["ttft"] > 0 for r in rows)
    assert data["oracle"]["20.0"]["output_throughput"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "| round_robin | 20 | 12/12 |" in md
    for png in ("latency_vs_load.png", "throughput_vs_load.png", "pod_load.png"):
        assert (tmp_path / png).stat().st_size > 5_000


def test_tiny_pd_epp_runs_sidecars_and_disaggregates(tmp_path: Path) -> None:
    """On a P/D pool the `epp` router puts a sidecar in front of the decode pod: the cold
    system prompts are prefilled on the prefill pod, the warm requests stay local."""
    rc = main([
        "tiny_pd", "--routers", "epp", "--out", str(tmp_path),
        "--sim-base-ip", "127.0.5.12", "--sim-port", "18191", "--router-port", "18196",
        "--requests", "12", "--max-phase-s", "15",
    ])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    (phase,) = data["phases"]
    s = phase["summary"]
    assert s["completed"] == 12 and s["errors"] == 0
    assert set(s["served_by_header"]) == {"127.0.5.13:18191"}  # the decode pod answers
    assert s["pd_modes"].get("disaggregated", 0) >= 1 and s["pd_modes"].get("local", 0) >= 1
    states = phase["pod_states"]
    assert states["127.0.5.12:18191"]["prefill_only_total"] == s["pd_modes"]["disaggregated"]
    assert states["127.0.5.13:18191"]["remote_prefilled_total"] == s["pd_modes"]["disaggregated"]


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmd:
                pids.append(int(proc.name))
    return pids


def test_a_terminated_run_stops_the_pool_and_routers_it_started(tmp_path: Path) -> None:
    """SIGTERM mid-phase: the runner exits 143 and leaves no simulator or Envoy behind
    (their command lines name the run's output folder)."""
    run = subprocess.Popen(
        [sys.executable, "-m", "bench.run", "tiny", "--routers", "round_robin",
         "--out", str(tmp_path), "--sim-base-ip", "127.0.5.22", "--sim-port", "18192",
         "--router-port", "18197", "--requests", "400", "--max-phase-s", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _processes_mentioning("envoy-rr-18197"):  # the router is starting
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(3)  # into the phase (400 requests at 20 req/s: ~20 s)
        children = [p for p in _processes_mentioning(str(tmp_path)) if p != run.pid]
        assert len(children) >= 2  # the pool and the gateway Envoy
        assert not (tmp_path / "raw" / "round_robin@20.jsonl").exists()  # written at its end
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while [p for p in _processes_mentioning(str(tmp_path)) if p != run.pid]:
            assert time.monotonic() < deadline, "left running after SIGTERM"
            time.sleep(0.2)
    finally:
        if run.poll() is None:
            run.kill()
