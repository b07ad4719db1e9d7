"""`bench.vsim.run(...)`: one simulated phase (scenario x router x rate) -> a summary dict.

The summary has the keys of `bench.report.summarize` (TTFT/TPOT/ITL/E2E percentiles, req/s,
output tok/s, cached ratio, SLO attainment, goodput, bootstrap CIs of TTFT p50/p90,
per-tenant breakdown) in model seconds, plus `per_pod` (requests each pod received),
`router` (router-specific decision counts), `decisions` (what the router predicted vs
what the engines did), `sim` (events, wall seconds, engine steps) and `oracle`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.scenarios import Scenario, get
from bench.scenarios.workload import WorkloadSpec, build
from bench.vsim.core import Simulation
from bench.vsim.routers import make_router
from bench.vsim.workload import VRequest, diurnal_warp, from_specs, load_trace
from epp.sim.config import SimConfig


def _host(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def scale_pool(pool: Sequence[SimConfig], n: int) -> list[SimConfig]:
    """`n` pods cycling through the scenario's pod shapes (roles, speeds, labels), each on
    its own address (nothing listens: the addresses only name the endpoints)."""
    base = list(pool)
    if n == len(base):
        return [c.replace() for c in base]
    return [base[i % len(base)].replace(host=_host(i + 2), port=8000) for i in range(n)]


@dataclasses.dataclass(slots=True)
class Phase:
    """Everything one simulated phase needs (resolved from a scenario and overrides)."""

    scenario: Scenario
    pool: list[SimConfig]
    rate: float
    requests: list[VRequest]
    seed: int
    time_scale: float
    send_deadline: float


def resolve(
    scenario: str | Scenario,
    *,
    pool_size: int | None = None,
    requests: int | None = None,
    rate: float | None = None,
    seed: int | None = None,
    time_scale: float | None = None,
    scale_groups: bool = True,
    diurnal_period_s: float = 0.0,
    diurnal_amplitude: float = 0.0,
    trace: str | Path | None = None,
    zipf_s: float | None = None,
) -> Phase:
    sc = get(scenario) if isinstance(scenario, str) else scenario
    base_pods = len(sc.pool)
    n = pool_size or base_pods
    pool = scale_pool(sc.pool, n)
    factor = n / base_pods
    if rate is None:
        rate = sc.rates[-1] * factor
    if seed is None:  # the harness seeds each rate's schedule with seed + its index
        seed = sc.seed + (sc.rates.index(rate) if rate in sc.rates else 0)
    count = requests or sc.requests_per_rate
    spec: WorkloadSpec = sc.workload
    changes: dict[str, Any] = {}
    if scale_groups and factor != 1 and spec.kind in ("shared_prefix", "multi_turn",
                                                       "multi_tenant"):
        changes["groups"] = max(1, round(spec.groups * factor))
        if spec.hot_groups:
            changes["hot_groups"] = max(1, round(spec.hot_groups * factor))
        if spec.kind == "multi_tenant" and spec.steady_rate:
            changes["steady_rate"] = spec.steady_rate * factor
    if zipf_s is not None:
        changes["zipf_s"] = zipf_s
    if changes:
        spec = dataclasses.replace(spec, **changes)
    if trace is not None:
        reqs = load_trace(trace, limit=count)
    else:
        reqs = from_specs(build(spec, rate, count, seed))
    if diurnal_period_s > 0 and diurnal_amplitude > 0:
        reqs = diurnal_warp(reqs, period_s=diurnal_period_s, amplitude=diurnal_amplitude)
    ts = time_scale if time_scale is not None else sc.time_scale
    # bench.run's phase bound (wall seconds): requests not sent by then are skipped.
    last = reqs[-1].at if reqs else 0.0
    bound_wall = sc.max_phase_s or (last * sc.time_scale + 60.0)
    deadline = bound_wall / sc.time_scale if trace is None else math.inf
    return Phase(sc, pool, rate, reqs, seed, ts, deadline)


def run(
    scenario: str | Scenario = "shared_prefix",
    router: str = "epp",
    *,
    epp_config_text: str | None = None,
    pool_size: int | None = None,
    requests: int | None = None,
    rate: float | None = None,
    seed: int | None = None,
    time_scale: float | None = None,
    response_body: bool = False,
    scrape_interval: float = 0.05,
    scale_groups: bool = True,
    diurnal_period_s: float = 0.0,
    diurnal_amplitude: float = 0.0,
    trace: str | Path | None = None,
    zipf_s: float | None = None,
    pd_sidecar: bool | None = None,
    fuse: bool = True,
    keep_requests: bool = False,
    router_seed: int | None = None,
    kv_events: bool = False,
    audit: bool = False,
) -> dict[str, Any]:
    """Simulate one phase and summarise it (model seconds).

    scenario: a `bench.scenarios` name or a `Scenario`. router: `epp`, `epp:<variant>`,
    `round_robin`, `least_loaded`, `power_of_two`, `cache_aware` (re-implementation; also
    `vllm-router:cache_aware`, `sglang-router:cache_aware`). epp_config_text: an
    EndpointPickerConfig for `epp` (None: the built-in default). pool_size: pods (cycling
    the scenario's pod shapes; with scale_groups the prefix groups and the default rate
    scale with it). rate: req/s (default: the scenario's highest, scaled). seed: None =
    the harness's schedule for that rate. time_scale: what the EPP's clock runs at
    relative to model time (default: the scenario's, as in the harness; 1 = production).
    response_body: the gateway also sends response bodies to the EPP (first token, usage)
    instead of headers only (the harness's default). trace: replay a JSONL trace.
    pd_sidecar: on P/D pools, run the prefill hop the router names (a decode-pod sidecar:
    prefill pod, KV transfer, decode); default: for `epp` routers on pools with prefill
    pods, as bench.run does (elsewhere the engines ignore the prefill header).
    keep_requests: put the per-request records under `_requests`. router_seed: seeds the
    routers' own random choices (tie-breaks) and the simulation's (scrape phases, error
    injection); default: the schedule's seed. Same seeds, same numbers. kv_events: the
    engines' KV events reach the EPP's indexes (always on for a config with the
    precise-prefix-cache-scorer, which also gets the simulator's tokenizer, as bench.run
    gives it). audit: at each pick, look up every pod's cache for the prompt (slow on big
    pools) and report under `decisions` how often and by how much the router passed over a
    pod that held more of it.
    """
    ph = resolve(
        scenario, pool_size=pool_size, requests=requests, rate=rate, seed=seed,
        time_scale=time_scale, scale_groups=scale_groups, diurnal_period_s=diurnal_period_s,
        diurnal_amplitude=diurnal_amplitude, trace=trace, zipf_s=zipf_s,
    )
    r = make_router(router, epp_config_text)
    if pd_sidecar is None:  # bench.run puts sidecars in front of decode pods of P/D pools
        pd_sidecar = router.partition(":")[0] == "epp" and any(
            c.role == "prefill" for c in ph.pool)
    sim = Simulation(
        ph.pool, r, ph.requests, time_scale=ph.time_scale,
        seed=ph.seed if router_seed is None else router_seed,
        scrape_interval=scrape_interval, response_body=response_body, fuse=fuse,
        send_deadline=ph.send_deadline, pd_sidecar=pd_sidecar, kv_events=kv_events,
        audit=audit,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    sim.run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = summarize(sim, ph)
    out["router"] = {"name": r.name, **r.stats()}
    out["sim"] = {
        "wall_s": wall,
        "cpu_s": cpu,
        "events": sim.events,
        "pods": len(sim.pods),
        "requests": len(ph.requests),
        "rate": ph.rate,
        "seed": ph.seed,
        "router_seed": sim.seed,
        "time_scale": ph.time_scale,
        "response_body": response_body,
        "engine_steps": sum(p.core.steps for p in sim.pods),
        "fused_runs": sum(p.core.fused_runs for p in sim.pods),
        "preemptions": sum(p.core.stats.preemptions for p in sim.pods),
        "tokenizer_additive": sim.tokens.additive,
        "kv_events_delivered": sim.kv_events_delivered,
    }
    if keep_requests:
        out["_requests"] = ph.requests
    return out


def run_seeds(
    scenario: str | Scenario = "shared_prefix", router: str = "epp", *,
    seeds: Sequence[int] = (1, 2, 3, 4, 5), **kwargs: Any,
) -> dict[str, Any]:
    """`run` once per router seed (same schedule): every numeric summary key as its median
    over the seeds, with `[min, max]` under `range`, and the single runs under `runs`. The
    EPP's tail depends on its random tie-breaks (bench/RESULTS.md §5.1): compare policies on
    medians."""
    runs = [run(scenario, router, router_seed=s, **kwargs) for s in seeds]
    out: dict[str, Any] = {"runs": runs, "range": {}}
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            vals = sorted(float(r[key]) for r in runs)
            out[key] = vals[len(vals) // 2]
            out["range"][key] = [vals[0], vals[-1]]
    return out


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def _boot_ci(values: np.ndarray, q: float, seed: int = 1, iterations: int = 1000) -> list[float]:
    n = len(values)
    if n < 2:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    iters = iterations if n <= 5000 else 200
    idx = rng.integers(0, n, size=(iters, n)) if n * iters <= 20_000_000 else None
    if idx is not None:
        stats = np.sort(np.percentile(values[idx], q, axis=1))
    else:
        stats = np.sort([np.percentile(values[rng.integers(0, n, n)], q) for _ in range(iters)])
    return [float(stats[int(0.025 * (iters - 1))]), float(stats[int(0.975 * (iters - 1))])]


def summarize(sim: Simulation, ph: Phase) -> dict[str, Any]:
    """`bench.report.summarize`'s keys from the simulated requests (model seconds)."""
    sc = ph.scenario
    reqs = [r for r in ph.requests if r.sent >= 0]
    out = _summary(reqs, sim, sc.slo_ttft_s, sc.slo_tpot_s, len(ph.requests))
    tenants = sorted({r.tenant for r in reqs if r.tenant})
    if tenants:
        out["by_tenant"] = {
            t: _summary([r for r in reqs if r.tenant == t], sim, sc.slo_ttft_s, sc.slo_tpot_s,
                        sum(1 for r in ph.requests if r.tenant == t), dur=out["duration_s"])
            for t in tenants
        }
    out["per_pod"] = {p.key: p.requests_total for p in sim.pods}
    out["decisions"] = _decisions(reqs, sim)
    out["oracle"] = oracle(ph)
    return out


def _summary(
    reqs: list[VRequest], sim: Simulation, slo_ttft: float, slo_tpot: float, scheduled: int,
    dur: float | None = None,
) -> dict[str, Any]:
    ok = [r for r in reqs if r.ok]
    end = max(max((r.end for r in reqs), default=0.0), sim.last_skipped)
    duration = dur if dur is not None else end
    out: dict[str, Any] = {
        "scheduled": scheduled,
        "sent": len(reqs),
        "completed": len(ok),
        "errors": len(reqs) - len(ok),
        "error_samples": sorted({f"{r.status} {r.error}"[:120] for r in reqs if not r.ok})[:5],
        "duration_s": duration,
    }
    ttft = np.array([r.first_token - r.sent for r in ok])
    e2e = np.array([r.end - r.sent for r in ok])
    outs = np.array([r.output_tokens for r in ok])
    multi = outs > 1
    tpot = (e2e[multi] - ttft[multi]) / (outs[multi] - 1) if len(ok) else np.array([])
    for name, vals in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = _pct(vals, q)
        out[f"{name}_mean"] = float(vals.mean()) if len(vals) else math.nan
        if name == "tpot":  # ITL sits between TPOT and E2E in bench.report's key order
            for q in (50, 90, 99):
                out[f"itl_p{q}"] = sim.itl.percentile(q) if dur is None else math.nan
            out["itl_mean"] = sim.itl.total / sim.itl.n if sim.itl.n and dur is None else math.nan
    for q in (50, 90):
        out[f"ttft_p{q}_ci"] = _boot_ci(ttft, q)
    out["request_throughput"] = len(ok) / duration if duration > 0 else math.nan
    out["output_throughput"] = int(outs.sum()) / duration if duration > 0 else math.nan
    prompt = sum(len(r.prompt_ids) for r in ok)
    out["cached_ratio"] = sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0
    good = 0
    for i, r in enumerate(ok):
        if ttft[i] <= slo_ttft and (r.output_tokens <= 1 or (e2e[i] - ttft[i]) / (
                r.output_tokens - 1) <= slo_tpot):
            good += 1
    out["slo_attainment"] = good / len(reqs) if reqs else 0.0
    out["goodput"] = good / duration if duration > 0 else math.nan
    served: dict[str, int] = {}
    for r in reqs:
        if r.server:
            served[r.server] = served.get(r.server, 0) + 1
    out["served_by_header"] = served
    return out


def _decisions(reqs: list[VRequest], sim: Simulation) -> dict[str, Any]:
    """What the routing decisions did: how many pods each prefix group was spread over,
    the router's predicted uncached tokens against the engines' (EPP only), load spread."""
    groups: dict[str, set[str]] = {}
    for r in reqs:
        if r.group and r.server:
            groups.setdefault(r.group, set()).add(r.server)
    spread = [len(s) for s in groups.values()]
    counts = [p.requests_total for p in sim.pods]
    mean = sum(counts) / len(counts) if counts else 0.0
    out: dict[str, Any] = {
        "groups": len(groups),
        "pods_per_group_mean": sum(spread) / len(spread) if spread else 0.0,
        "pods_per_group_max": max(spread, default=0),
        "requests_per_pod_cv": (
            float(np.std(counts)) / mean if mean > 0 else 0.0
        ),
        "busiest_pod_share": max(counts) / sum(counts) if sum(counts) else 0.0,
    }
    audited = [r for r in reqs if r.audit is not None]
    if audited:
        prompt = sum(len(r.prompt_ids) for r in audited) or 1
        passed = [r for r in audited if r.audit is not None and r.audit[1] - r.audit[0] > 0]
        out["audit"] = {
            "requests": len(audited),
            # picks that went to a pod holding fewer of the prompt's blocks than another
            "passed_over_share": len(passed) / len(audited),
            # prompt tokens the best pod held that the chosen one did not, over all prompts
            "missed_cached_share": sum(
                r.audit[1] - r.audit[0] for r in passed if r.audit is not None
            ) / prompt,
            "best_cached_share": sum(r.audit[1] for r in audited if r.audit is not None)
            / prompt,
        }
    pred = [(r.predicted_uncached, len(r.prompt_ids) - r.cached_tokens) for r in reqs
            if r.predicted_uncached >= 0 and r.ok]
    if pred:
        p = np.array(pred, dtype=float)
        out["predicted_uncached_mean"] = float(p[:, 0].mean())
        out["actual_uncached_mean"] = float(p[:, 1].mean())
        out["uncached_abs_error_mean"] = float(np.abs(p[:, 0] - p[:, 1]).mean())
    return out


def oracle(ph: Phase) -> dict[str, Any]:
    """`bench.scenarios.oracle` for scenario-sized schedules (it re-tokenizes every prompt:
    skipped past 5,000 requests)."""
    if len(ph.requests) > 5000:
        return {}
    from bench.scenarios.oracle import oracle as compute
    from bench.scenarios.workload import RequestSpec

    specs = [
        RequestSpec(r.at, r.messages, r.max_tokens, session=r.session, group=r.group,
                    prefix_tokens=r.prefix_tokens)
        for r in ph.requests
    ]
    return compute(ph.pool, specs, ph.rate)
