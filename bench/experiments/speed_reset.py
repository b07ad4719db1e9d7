"""A replica restarted under load, in virtual time: the EPP's speed learning is reset
mid-run (what a restarted replica lacks: its peers give it their loads and prefill charges
over sync, but no speed readings), with and without the pool's measured speed handed over.

    python -m bench.experiments.speed_reset kv_pressure --rate 8 --at 15 --seeds 0,100,200

Modes per schedule: `none` (no reset), `reset` (the latency priors until the EPP's own next
reading), `adopt` (reset, then the fleet's measured speed taken as the first reading, as a
peer's snapshot would give it). Prints the TTFT p90 of the requests sent in the `--window`
model seconds after the reset, per mode, and `adopt - reset` with a 95% bootstrap interval.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace

from bench.experiments.paired import bootstrap_mean_ci
from bench.scenarios import get
from bench.vsim.api import resolve
from bench.vsim.core import Simulation
from bench.vsim.routers import EppRouter, make_router
from epp.datalayer.endpoint import LatencyStats

MODES = ("none", "reset", "adopt")


def window_p90(scenario: str, rate: float, seed: int, mode: str, at: float, window: float) -> float:
    ph = resolve(scenario, rate=rate, seed=get(scenario).seed + seed)
    router = make_router("epp")
    assert isinstance(router, EppRouter)
    sim = Simulation(ph.pool, router, ph.requests, time_scale=ph.time_scale, seed=ph.seed,
                     send_deadline=ph.send_deadline)  # fmt: skip

    def restart(_: object) -> None:
        model = router.director.scheduler.services.latency
        measured_ms = model.fleet_speed * model.priors.tpot_ms if model.fleet_measured else 0.0
        model.fleet_speed, model.fleet_measured = 1.0, False
        model.priors = replace(model.configured)
        for ep in router.datastore.endpoints():
            ep.latency = LatencyStats()
        if mode == "adopt" and measured_ms > 0:
            model.fleet_speed, model.fleet_measured = measured_ms / model.priors.tpot_ms, True

    if mode != "none":
        sim.push(at, restart)
    sim.run()
    ttft = sorted(
        q.first_token - q.sent
        for q in ph.requests
        if at <= q.at < at + window and q.status == 200 and q.first_token > 0
    )
    return ttft[int(0.9 * (len(ttft) - 1))] if ttft else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("scenario")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--at", type=float, default=15.0, help="reset time, model seconds")
    p.add_argument("--window", type=float, default=10.0, help="model seconds after the reset")
    p.add_argument("--seeds", default="0,100,200,300,400,500,600,700,800,900")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    p90 = {m: [window_p90(a.scenario, a.rate, s, m, a.at, a.window) for s in seeds] for m in MODES}
    for m in MODES:
        print(f"{m}: mean TTFT p90 after the reset {statistics.fmean(p90[m]):.3f}")
    diff = [x - y for x, y in zip(p90["adopt"], p90["reset"], strict=True)]
    lo, hi = bootstrap_mean_ci(diff)
    print(f"adopt - reset: {statistics.fmean(diff):+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
