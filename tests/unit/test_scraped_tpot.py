"""Decode speed from the engines' own TPOT histograms: parsed, turned into a recent mean,
and used to steer requests away from a slow pod."""

from __future__ import annotations

from epp.datalayer.endpoint import Endpoint, EngineMetrics
from epp.datalayer.metrics_scraper import apply_metrics
from epp.datalayer.prom_parse import parse_metrics
from epp.scheduling.plugins.latency_scorer import LatencyScorer
from epp.scheduling.request import CycleState, InferenceRequest
from epp.scheduling.services import Services

PAGE = b"""# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 2.0
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{le="0.01",model_name="m"} 3.0
vllm:time_per_output_token_seconds_sum{model_name="m"} %(tsum)s
vllm:time_per_output_token_seconds_count{model_name="m"} %(tcount)s
vllm:time_per_output_token_seconds_sum{model_name="other"} 1.0
vllm:time_per_output_token_seconds_count{model_name="other"} 100.0
"""


def page(tsum: float, tcount: float, itl: tuple[float, float] | None = None) -> bytes:
    text = PAGE % {b"tsum": str(tsum).encode(), b"tcount": str(tcount).encode()}
    if itl is not None:
        text += (
            b"# TYPE vllm:inter_token_latency_seconds histogram\n"
            b"vllm:inter_token_latency_seconds_sum %f\nvllm:inter_token_latency_seconds_count %f\n"
            % itl
        )
    return text


def test_parse_sums_series_and_prefers_inter_token_latency() -> None:
    p = parse_metrics(page(2.0, 100.0))
    assert p.tpot_sum == 3.0 and p.tpot_count == 200.0  # both model_name series summed
    p = parse_metrics(page(2.0, 100.0, itl=(5.0, 50.0)))
    assert (p.tpot_sum, p.tpot_count) == (5.0, 50.0)


def test_recent_mean_from_scrape_deltas_and_restart() -> None:
    m = EngineMetrics()
    apply_metrics(m, parse_metrics(page(0.0, 0.0)), 1.0)  # fresh engine: a valid baseline
    assert m.tpot_recent_ms == 0.0
    apply_metrics(m, parse_metrics(page(0.3, 10.0)), 2.0)  # 10 tokens, 0.3 s -> 30 ms
    assert abs(m.tpot_recent_ms - 30.0) < 1e-6
    apply_metrics(m, parse_metrics(page(0.3, 10.0)), 3.0)  # nothing decoded: unchanged
    assert abs(m.tpot_recent_ms - 30.0) < 1e-6
    apply_metrics(m, parse_metrics(page(0.05, 5.0)), 4.0)  # restart: counters went back
    assert abs(m.tpot_recent_ms - 30.0) < 1e-6
    apply_metrics(m, parse_metrics(page(0.15, 15.0)), 5.0)  # 10 ms/token since the restart
    assert 10.0 < m.tpot_recent_ms < 30.0


def _scores(tpots: list[float]) -> list[float]:
    eps = [Endpoint(f"127.0.0.{i + 2}", 8000) for i in range(len(tpots))]
    for ep, t in zip(eps, tpots, strict=True):
        ep.metrics.tpot_recent_ms = t
    req = InferenceRequest("r", "m", prompt=b"x" * 400, prompt_tokens=100, max_tokens=200)
    return LatencyScorer(services=Services()).score(CycleState(), req, eps)


def test_slow_pod_scores_lower_and_noise_is_ignored() -> None:
    fast, slow = _scores([12.0, 36.0])
    assert fast == 1.0 and slow < 0.5
    a, b = _scores([12.0, 13.0])  # within the dead zone: no preference
    assert a == b == 1.0
    a, b = _scores([0.0, 12.0])  # unknown speed: no penalty either way
    assert a == b == 1.0
