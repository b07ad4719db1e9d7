"""Cost-aware filter: SLO requests go to the cheapest pods predicted to meet the SLO."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from epp import clock
from epp.datalayer.endpoint import Endpoint
from epp.scheduling.config import ConfigError, build_scheduler
from epp.scheduling.plugins.cost_filter import CostAwareFilter
from epp.scheduling.request import CycleState, InferenceRequest
from epp.scheduling.services import Services


def pod(n: int, cost: str | None, queued_tokens: int = 0) -> Endpoint:
    e = Endpoint(f"127.0.0.{n}", 8000, labels={"cost": cost} if cost is not None else {})
    if queued_tokens:
        e.queue.backlog_tokens, e.queue.backlog_at = queued_tokens, clock.now()
    return e


def run(
    f: CostAwareFilter, eps: list[Endpoint], ttft: float | None = None, tpot: float | None = None
) -> list[Endpoint]:
    r = InferenceRequest("r", "m", prompt=b"x" * 400, prompt_tokens=100)
    r.slo_ttft_ms, r.slo_tpot_ms = ttft, tpot
    return f.filter(CycleState(), r, eps)


def make(**params: Any) -> CostAwareFilter:
    return CostAwareFilter("cost", params, Services())


def test_without_slo_headers_nothing_changes() -> None:
    eps = [pod(1, "1"), pod(2, "0.3")]
    assert run(make(), eps) == eps


def test_cheapest_pod_that_meets_the_ttft_slo() -> None:
    # priors: ~30 ms + 0.25 ms/token; the cheap pod has 4000 tokens queued (~1 s)
    h100, l4, cheap_busy = pod(1, "1"), pod(2, "0.5"), pod(3, "0.2", queued_tokens=4000)
    eps = [h100, l4, cheap_busy]
    assert run(make(), eps, ttft=500) == [l4]
    assert run(make(), eps, ttft=5000) == [cheap_busy]  # loose SLO: the busy one is fine
    # nobody can: unchanged, the scorers pick the least bad
    assert run(make(), eps, ttft=1) == eps


def test_tpot_slo_and_tolerance_and_default_cost() -> None:
    a, b, unlabelled = pod(1, "0.5"), pod(2, "0.55"), pod(3, None)
    b.inflight.requests = 0
    a.inflight.requests = 400  # a big decode batch: predicted TPOT ~ 12 + 0.15 x 401 ms
    eps = [a, b, unlabelled]
    assert run(make(), eps, tpot=30) == [b]
    assert run(make(tolerance=0.2), eps, tpot=1000) == [a, b]
    assert run(make(defaultCost=0.1), eps, tpot=1000) == [unlabelled]
    # an unreadable label counts as the default cost
    bad = pod(4, "cheap")
    assert run(make(defaultCost=0.01), [a, bad], ttft=1000) == [bad]


def test_safety_factor_demands_margin() -> None:
    e1, e2 = pod(1, "1"), pod(2, "0.1", queued_tokens=1200)  # ~355 ms predicted
    assert run(make(), [e1, e2], ttft=400) == [e2]
    assert run(make(safetyFactor=1.5), [e1, e2], ttft=400) == [e1]


def test_in_a_profile_and_bad_parameters() -> None:
    cfg = """
plugins:
- type: cost-aware-filter
  parameters: {costLabel: price}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: cost-aware-filter}, {pluginRef: max-score-picker}]
"""
    sched = build_scheduler(cfg)
    eps = [
        Endpoint("127.0.0.1", 8000, labels={"price": "3"}),
        Endpoint("127.0.0.2", 8000, labels={"price": "1"}),
    ]
    r = InferenceRequest("r", "m", prompt=b"hi", prompt_tokens=1, slo_ttft_ms=1000)
    assert sched.schedule(r, eps).target is eps[1]
    with pytest.raises(ConfigError, match="unknown parameter"):
        build_scheduler(cfg.replace("costLabel", "label"))
    with pytest.raises(ConfigError, match="safetyFactor"):
        build_scheduler(cfg.replace("costLabel: price", "safetyFactor: 0"))


def test_a_pod_reported_slower_is_predicted_slower_until_its_rate_is_learned() -> None:
    fast, slow = pod(1, "1"), pod(2, "0.4")
    f = make()
    # the engines' token-latency histograms, two scrapes of a window with no prefill:
    # 10 ms and 25 ms per token (the priors say 12)
    now = clock.now()
    for e in (fast, slow):
        e.metrics.tpot_sum, e.metrics.tpot_count, e.metrics.updated_at = 0.0, 0.0, now - 1
        f.services.latency.refresh(e, now - 1)
        e.metrics.tpot_count, e.metrics.updated_at = 100.0, now
    fast.metrics.tpot_sum, slow.metrics.tpot_sum = 1.0, 2.5
    # prior: 30 + 0.25 x 1600 = 430 ms on a prior-speed pod; ~360 ms fast, ~900 ms slow
    r = InferenceRequest("r", "m", prompt=b"x" * 6400, prompt_tokens=1600, slo_ttft_ms=800)
    assert f.filter(CycleState(), r, [fast, slow]) == [fast]
    slow.latency.prefill_ms_per_token = 0.3  # learned: ~60 + 480 ms, it is fine after all
    assert f.filter(CycleState(), r, [fast, slow]) == [slow]


def test_cost_bench_variant_is_the_default_config_plus_the_filter() -> None:
    import yaml

    from epp.scheduling.config import DEFAULT_CONFIG

    root = Path(__file__).resolve().parents[2]
    variant = yaml.safe_load((root / "bench/scenarios/epp_configs/cost.yaml").read_text())
    default = yaml.safe_load(DEFAULT_CONFIG)
    variant["plugins"] = [p for p in variant["plugins"] if p["type"] != "cost-aware-filter"]
    for prof in variant["schedulingProfiles"]:
        prof["plugins"] = [r for r in prof["plugins"] if r["pluginRef"] != "cost-aware-filter"]
    assert variant == default
