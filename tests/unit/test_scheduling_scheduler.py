"""The scheduler end to end with the built-in config: profiles, P/D decision, predictions."""

from __future__ import annotations

from typing import Any

import pytest

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.config import build_scheduler
from epp.scheduling.framework import SchedulingError
from epp.scheduling.request import InferenceRequest
from epp.scheduling.scheduler import Scheduler
from epp.scheduling.services import Services

LONG = 16_000  # bytes: ~4000 tokens
SHORT = 200  # bytes: ~50 tokens


def ep(n: int, role: str = "", business: str = "unassigned") -> Endpoint:
    return Endpoint(f"127.0.0.{n}", 8000, role=role, business=business)


def req(size: int, seed: str = "x", **kw: Any) -> InferenceRequest:
    prompt = (seed * size).encode()[:size]
    return InferenceRequest(request_id="r", model="m", prompt=prompt, prompt_tokens=size // 4, **kw)


def default_scheduler(**kw: Any) -> Scheduler:
    return build_scheduler(None, services=Services(), **kw)


def test_pd_long_fresh_prompt_goes_to_idle_prefill_pod() -> None:
    s = default_scheduler()
    decode, prefill = ep(1, "decode"), ep(2, "prefill")
    res = s.schedule(req(LONG), [decode, prefill])
    assert res.target is decode
    assert res.prefill is prefill
    assert set(res.profiles) == {"decode", "prefill"}
    assert res.uncached_tokens == LONG // 4


def test_pd_short_prompt_stays_local() -> None:
    s = default_scheduler()
    decode, prefill = ep(1, "decode"), ep(2, "prefill")
    res = s.schedule(req(SHORT), [decode, prefill])
    assert res.target is decode
    assert res.prefill is None


def test_pd_prompt_cached_on_decode_pod_stays_local() -> None:
    s = default_scheduler()
    decode, prefill = ep(1, "decode"), ep(2, "prefill")
    r = req(LONG, seed="conversation history ")
    idx = s.services.prefix_index
    idx.insert(decode, idx.hash_prompt("m", r.prompt))
    res = s.schedule(r, [decode, prefill])
    assert res.target is decode
    assert res.prefill is None
    assert res.uncached_tokens < 256


def test_pd_no_prefill_pods_means_no_prefill() -> None:
    s = default_scheduler()
    pool = [ep(1, "decode"), ep(2, "decode"), ep(3, "")]
    res = s.schedule(req(LONG), pool)
    assert res.prefill is None
    assert res.target in pool


def test_pd_prefill_pod_never_decodes_and_never_prefills_for_itself() -> None:
    s = default_scheduler()
    both, prefill = ep(1, "both"), ep(2, "prefill")
    for _ in range(10):
        res = s.schedule(req(LONG), [both, prefill])
        assert res.target is both
        assert res.prefill is None or res.prefill is prefill
    only_both = s.schedule(req(LONG), [ep(3, "both")])
    assert only_both.prefill is None


def test_pd_only_prefill_pods_is_a_scheduling_error() -> None:
    s = default_scheduler()
    with pytest.raises(SchedulingError):
        s.schedule(req(SHORT), [ep(1, "prefill")])
    with pytest.raises(SchedulingError):
        s.schedule(req(SHORT), [])


def test_business_filter_applies_to_both_profiles() -> None:
    s = default_scheduler()
    d_a, d_b = ep(1, "decode", "a"), ep(2, "decode", "b")
    p_a, p_b = ep(3, "prefill", "a"), ep(4, "prefill", "b")
    for _ in range(5):
        res = s.schedule(req(LONG, business="a"), [d_a, d_b, p_a, p_b])
        assert res.target is d_a
        assert res.prefill in (None, p_a)


def test_load_spreads_when_in_flight_is_charged() -> None:
    """Charging what was picked (as the director does) moves the next pick elsewhere."""
    s = default_scheduler()
    pool = [ep(i) for i in range(1, 5)]
    picked = []
    for i in range(8):
        res = s.schedule(req(SHORT, seed=f"{i}-"), pool)
        t = res.target
        t.inflight.requests += 1
        t.inflight.tokens += 300
        t.inflight.pending_requests += 1
        t.inflight.pending_prefill_tokens += res.uncached_tokens
        picked.append(t.key)
    assert sorted(picked.count(e.key) for e in pool) == [2, 2, 2, 2]


def test_same_prefix_returns_to_the_same_endpoint() -> None:
    s = default_scheduler()
    pool = [ep(i) for i in range(1, 5)]
    r1 = req(8000, seed="shared system prompt ")
    first = s.schedule(r1, pool)
    s.services.prefix_index.insert(first.target, first.prefix_hashes)
    assert first.prefix_hashes  # the scheduler hands the hashes to the director
    for _ in range(5):
        again = s.schedule(req(8000, seed="shared system prompt "), pool)
        assert again.target is first.target


def test_predictions_and_slo_flag_recorded() -> None:
    s = default_scheduler()
    pool = [ep(1)]
    plain = s.schedule(req(SHORT), pool)
    assert plain.slo_met is None
    assert plain.predicted_ttft_ms is not None and plain.predicted_ttft_ms > 0
    assert plain.predicted_tpot_ms is not None and plain.predicted_tpot_ms > 0
    assert s.schedule(req(SHORT, slo_ttft_ms=10_000.0), pool).slo_met is True
    assert s.schedule(req(LONG, slo_ttft_ms=1.0), pool).slo_met is False
    assert s.schedule(req(SHORT, slo_tpot_ms=0.01), pool).slo_met is False


def test_timer_and_debug_scores() -> None:
    seen: list[tuple[str, str]] = []
    s = default_scheduler(timer=lambda kind, name, sec: seen.append((kind, name)), debug=True)
    pool = [ep(1), ep(2)]
    res = s.schedule(req(SHORT), pool)
    kinds = {k for k, _ in seen}
    assert kinds == {"filter", "scorer", "picker"}
    assert ("scorer", "delay-cost-scorer") in seen
    prof = res.profiles["decode"]
    assert set(prof.scores) == {e.key for e in pool}
    assert prof.per_plugin is not None
    assert all(len(v) == 2 for v in prof.per_plugin.values())
    # the target has the best total score
    assert prof.scores[res.target.key] == max(prof.scores.values())
