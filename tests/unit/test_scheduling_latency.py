"""Latency model: TTFT/TPOT predictions move the right way and are learned online."""

from __future__ import annotations

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.latency_model import LatencyModel


def ep(n: int = 1) -> Endpoint:
    return Endpoint(f"127.0.0.{n}", 8000)


def test_ttft_grows_with_uncached_tokens_and_queued_work() -> None:
    m = LatencyModel()
    e = ep()
    idle_short = m.predict_ttft_ms(e, 100)
    idle_long = m.predict_ttft_ms(e, 4000)
    assert 0 < idle_short < idle_long
    e.inflight.pending_prefill_tokens = 4000
    assert m.predict_ttft_ms(e, 100) > idle_short
    queued = m.predict_ttft_ms(e, 100)
    e.inflight.prefill_tokens = 4000  # prefill hops queued here count too
    assert m.predict_ttft_ms(e, 100) > queued


def test_engine_waiting_we_did_not_send_counts_as_queue() -> None:
    m = LatencyModel()
    e = ep()
    base = m.predict_ttft_ms(e, 100)
    e.metrics.waiting = 3
    with_foreign = m.predict_ttft_ms(e, 100)
    assert with_foreign > base
    e.inflight.pending_requests = 3  # those 3 are ours and already counted as pending work
    assert m.predict_ttft_ms(e, 100) == base
    assert m.queued_prefill_tokens(e) == 0


def test_tpot_grows_with_batch() -> None:
    m = LatencyModel()
    e = ep()
    small = m.predict_tpot_ms(e)
    e.inflight.requests = 50
    mid = m.predict_tpot_ms(e)
    e.metrics.running = 200  # the engine sees a bigger batch than we sent
    assert small < mid < m.predict_tpot_ms(e)


def test_learns_prefill_rate_from_long_prompts() -> None:
    m = LatencyModel()
    e = ep()
    # true engine: 30 ms + 1 ms/token (4x slower than the prior)
    for _ in range(60):
        m.observe_ttft(e, 30.0 + 1.0 * 3000, 3000)
    assert e.latency.samples == 60
    assert abs(e.latency.prefill_ms_per_token - 1.0) < 0.1
    assert abs(m.predict_ttft_ms(e, 2000) - 2030.0) < 250


def test_learns_base_from_short_prompts() -> None:
    m = LatencyModel()
    e = ep()
    for _ in range(60):
        m.observe_ttft(e, 80.0 + 0.25 * 20, 20)
    assert abs(e.latency.ttft_base_ms - 80.0) < 8


def test_learns_tpot() -> None:
    m = LatencyModel()
    e = ep()
    for _ in range(60):
        m.observe_tpot(e, 40.0, 0)
    assert abs(m.predict_tpot_ms(e, extra_seqs=0) - 40.0) < 4


def test_unobserved_endpoints_follow_the_fleet() -> None:
    m = LatencyModel()
    seen, unseen = ep(1), ep(2)
    before = m.predict_ttft_ms(unseen, 2000)
    for _ in range(200):
        m.observe_ttft(seen, 30.0 + 1.0 * 3000, 3000)
    after = m.predict_ttft_ms(unseen, 2000)
    assert after > before * 2  # moved toward the slow fleet, not left at the H100 prior
    assert unseen.latency.samples == 0
