"""Workload generators and report statistics the quality claims rest on."""

from __future__ import annotations

import statistics
from collections import Counter

from bench.report import bootstrap_ci, percentile, summarize
from bench.scenarios import SCENARIOS, get
from bench.scenarios.driver import Result
from bench.scenarios.workload import WorkloadSpec, build


def test_same_seed_same_schedule() -> None:
    for name in ("shared_prefix", "kv_pressure", "hot_prefix", "multi_tenant"):
        sc = get(name)
        a = build(sc.workload, sc.rates[0], 100, 7)
        b = build(sc.workload, sc.rates[0], 100, 7)
        assert [(r.at, r.group, r.messages) for r in a] == [(r.at, r.group, r.messages) for r in b]


def test_hot_groups_carry_their_share() -> None:
    spec = WorkloadSpec(groups=8, hot_groups=2, hot_fraction=0.8)
    groups = Counter(r.group for r in build(spec, 10.0, 4000, 1))
    assert 0.77 < (groups["g0"] + groups["g1"]) / 4000 < 0.83
    assert len(groups) == 8


def test_zipf_popularity_is_skewed() -> None:
    groups = Counter(r.group for r in build(WorkloadSpec(groups=10, zipf_s=1.0), 10.0, 4000, 1))
    assert groups["g0"] > 2.5 * groups["g4"]


def test_multi_tenant_rates_and_headers() -> None:
    sc = get("multi_tenant")
    flood = build(sc.workload, 8.0, 800, 1)
    by_tenant = Counter(r.tenant for r in flood)
    assert by_tenant == {"tenant-a": 200, "tenant-b": 600}
    a = [r for r in flood if r.tenant == "tenant-a"]
    # tenant A keeps its own rate however hard B floods
    assert 0.85 < len(a) / a[-1].at / 2.0 < 1.15
    assert all(r.headers["x-gateway-inference-fairness-id"] == r.tenant for r in flood)
    assert [r.at for r in flood] == sorted(r.at for r in flood)


def test_quality_scenarios_have_enough_requests() -> None:
    for name in ("shared_prefix", "bursts", "mixed", "kv_pressure", "hot_prefix", "hetero",
                 "multi_tenant", "multi_turn", "pd", "pd_multi_turn"):
        assert SCENARIOS[name].requests_per_rate >= 400, name


def test_bootstrap_ci_brackets_the_percentile_and_narrows_with_n() -> None:
    import random

    rng = random.Random(3)
    small = [rng.expovariate(1.0) for _ in range(100)]
    big = [rng.expovariate(1.0) for _ in range(2000)]
    lo, hi = bootstrap_ci(small, 90)
    assert lo <= percentile(small, 90) <= hi
    blo, bhi = bootstrap_ci(big, 90)
    assert (bhi - blo) < (hi - lo)
    assert bootstrap_ci(small, 90) == (lo, hi)  # seeded


def test_summary_breaks_down_by_tenant_and_counts_goodput() -> None:
    results = [
        Result(ok=True, status=200, start=0, ttft=0.1, e2e=1.0, output_tokens=10, tenant="a"),
        Result(ok=True, status=200, start=0, ttft=3.0, e2e=4.0, output_tokens=10, tenant="b"),
        Result(ok=False, status=429, start=0, tenant="b"),
    ]
    s = summarize(results, wall_s=10.0, time_scale=1.0, slo_ttft_s=1.0, slo_tpot_s=0.5,
                  scheduled=3)
    assert s["goodput"] == 0.1  # one request met the SLOs in 10 s
    assert s["by_tenant"]["a"]["slo_attainment"] == 1.0
    assert s["by_tenant"]["b"]["completed"] == 1 and s["by_tenant"]["b"]["errors"] == 1
    assert statistics.fmean(s["ttft_p50_ci"]) > 0
