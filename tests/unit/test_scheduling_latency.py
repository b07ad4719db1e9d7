"""Latency model: TTFT/TPOT predictions move the right way and are learned online."""

from __future__ import annotations

import pytest

from epp import clock
from epp.datalayer.endpoint import Endpoint
from epp.scheduling.latency_model import FLEET_SPEED_ALPHA, LatencyModel


def ep(n: int = 1) -> Endpoint:
    return Endpoint(f"127.0.0.{n}", 8000)


def test_ttft_grows_with_uncached_tokens_and_queued_work() -> None:
    m = LatencyModel()
    e = ep()
    idle_short = m.predict_ttft_ms(e, 100)
    idle_long = m.predict_ttft_ms(e, 4000)
    assert 0 < idle_short < idle_long
    m.charge_backlog(e, 4000, clock.now())  # prefill work sent there, not done yet
    queued = m.predict_ttft_ms(e, 100)
    assert queued > idle_short + 500  # ~1 s of prefill ahead at the prior's speed
    m.charge_backlog(e, 4000, clock.now())
    assert m.predict_ttft_ms(e, 100) > queued


def test_prefill_backlog_drains_with_time() -> None:
    m = LatencyModel()
    e = ep()
    m.charge_backlog(e, 4000, 100.0)
    rate = m.prefill_tokens_per_s(e, 100.0)
    assert m.backlog_tokens(e, 100.5, rate) == 4000 - 0.5 * rate
    assert m.backlog_tokens(e, 200.0, rate) == 0.0
    # a first token for a request charged after 1000 of those tokens: the rest is done
    m.charge_backlog(e, 1000, 100.5)
    position = e.queue.charged_total
    m.settle_backlog(e, position, 100.6)
    assert m.backlog_tokens(e, 100.6, rate) == 0.0


def test_engine_waiting_we_did_not_send_counts_as_queue() -> None:
    m = LatencyModel()
    e = ep()
    now = clock.now()
    base = m.predict_ttft_ms(e, 100, now=now)
    e.metrics.waiting, e.metrics.updated_at = 3, now  # a fresh scrape
    with_foreign = m.predict_ttft_ms(e, 100, now=now)
    assert with_foreign > base
    assert m.queued_prefill_tokens(e, now) == 3 * m.priors.unknown_queue_tokens
    e.metrics.updated_at = now - 5.0  # an old scrape says nothing about now
    assert m.predict_ttft_ms(e, 100, now=now) == base


def test_a_full_batch_waits_for_a_slot() -> None:
    m = LatencyModel()
    e = ep()
    now = clock.now()
    e.latency.max_running = 8  # the most it was ever seen running: its batch limit
    e.metrics.running, e.metrics.waiting, e.metrics.updated_at = 8, 4, now
    q = m.queue(e, now, decode_tokens=128)
    assert q.slot_wait_s > 0 and q.backlog_tokens == 0
    # ~4 requests ahead, each slot frees after ~128 tokens: 4 x 128 x 12 ms / 8
    assert abs(q.slot_wait_s - 4 * 128 * 0.012 / 8) < 0.05


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


def _scrape(e: Endpoint, at: float, tokens: float, seconds: float, waiting: float = 0.0) -> None:
    m = e.metrics
    m.tpot_count, m.tpot_sum, m.updated_at, m.waiting = tokens, seconds, at, waiting


def test_a_polluted_first_speed_reading_does_not_stick() -> None:
    """A pod's first decode-speed window can hold a prefill step the EPP did not count (its
    fluid model thought the prefill done): 458 ms a token where the pod decodes at 12.
    Taken as it was, the pod's predicted prefill ran 38x too slow and its queue never
    looked drained again, so no clean window ever came to correct it."""
    m = LatencyModel()
    e = ep()
    _scrape(e, 100.0, 0.0, 0.0)
    m.refresh(e, 100.0)  # the baseline
    _scrape(e, 101.0, 10.0, 4.58)
    m.refresh(e, 101.0)
    assert 0 < e.latency.decode_tpot_ms < 3 * m.priors.tpot_ms * 2  # not 458
    assert m.prefill_tokens_per_s(e, 101.0) > 1000.0 / (m.priors.prefill_ms_per_token * 6)
    _scrape(e, 102.0, 110.0, 4.58 + 1.2)  # then a clean window: 12 ms a token, at once
    m.refresh(e, 102.0)
    assert e.latency.decode_tpot_ms == 12.0


def test_the_first_speed_reading_replaces_the_fleet_guess_and_later_ones_average() -> None:
    """A pod not measured yet is predicted at the fleet's speed. Before any reading that is
    the priors' guess; the first reading (here a pool 2x slower than the priors) replaces
    it at once, later readings move it by FLEET_SPEED_ALPHA."""
    m = LatencyModel()
    measured, unmeasured = ep(1), ep(2)
    assert m.speeds(unmeasured, 100.0)[1] == 1.0
    _scrape(measured, 100.0, 0.0, 0.0)
    m.refresh(measured, 100.0)
    _scrape(measured, 101.0, 100.0, 2.4)  # 24 ms a token
    m.refresh(measured, 101.0)
    assert m.speeds(unmeasured, 101.0)[1] == 2.0
    _scrape(measured, 102.0, 200.0, 2.4 + 1.2)  # then 12 ms a token
    m.refresh(measured, 102.0)
    assert m.speeds(unmeasured, 102.0)[1] == pytest.approx(2.0 + FLEET_SPEED_ALPHA * (1.0 - 2.0))


def test_a_genuinely_slow_pod_is_still_learned() -> None:
    m = LatencyModel()
    e = ep()
    _scrape(e, 100.0, 0.0, 0.0)
    m.refresh(e, 100.0)
    _scrape(e, 101.0, 100.0, 3.0)  # 30 ms a token, 2.5x the fleet: plausible, taken
    m.refresh(e, 101.0)
    assert e.latency.decode_tpot_ms == 30.0


def test_queued_prefill_is_bounded_when_the_engine_has_nothing_waiting() -> None:
    """With headers-only response processing nothing reports first tokens, so a speed guess
    too slow or an uncached-token guess too high would stay in the fluid queue for good.
    A fresh scrape with nothing waiting bounds it to the prompts that can still be mid
    prefill; one with requests waiting leaves it alone."""
    m = LatencyModel()
    busy, idle = ep(1), ep(2)
    for e in (busy, idle):
        e.latency.uncached_tokens = 1000.0
        m.charge_backlog(e, 40_000, 100.0)  # ~10 s of prefill at the prior's speed
        e.metrics.running = 3
    _scrape(busy, 100.1, -1.0, 0.0, waiting=5)
    _scrape(idle, 100.1, -1.0, 0.0, waiting=0)
    for e in (busy, idle):
        m.refresh(e, 100.1)
    rate = m.prefill_tokens_per_s(idle, 100.1)
    assert m.backlog_tokens(idle, 100.1, rate) <= 2.1 * 1000
    assert m.backlog_tokens(busy, 100.1, rate) > 35_000


def test_requests_waiting_are_the_newest_sent_not_the_mean() -> None:
    """Two cold 2000-token prompts then four followers of their cached prefixes: the engine
    reports four waiting, behind a prefill. They are the four newest (60 tokens each), not
    four of the mean of everything sent (pulled toward 2000 by the cold prompts), which made
    the pod look a second busier than it was and sent the next follower cold elsewhere."""
    m = LatencyModel()
    e = ep()
    for tokens in (2000, 2000, 60, 60, 60, 60):
        m.observe_sent(e, tokens)
        m.charge_backlog(e, tokens, 100.0)
    later = 200.0  # the fluid model has long drained it all
    e.metrics.waiting, e.metrics.updated_at = 4, later
    assert m.queue(e, later).backlog_tokens == 240
    e.metrics.waiting = 5  # one of the cold prompts is still waiting too
    assert m.queue(e, later).backlog_tokens == 2240
    assert e.latency.uncached_tokens > 500  # what the estimate used to be built from
