"""Scorers: values in [0, 1], aligned with the endpoint list, ordering endpoints correctly."""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.framework import SchedulingResult, Scorer
from epp.scheduling.plugins.inflight_scorer import ActiveRequestScorer, InFlightScorer
from epp.scheduling.plugins.kv_cache_scorer import KVCacheUtilizationScorer
from epp.scheduling.plugins.latency_scorer import LatencyScorer
from epp.scheduling.plugins.prefix_scorer import PrefixCacheScorer
from epp.scheduling.plugins.queue_scorer import QueueScorer
from epp.scheduling.plugins.session_scorer import SessionAffinityScorer
from epp.scheduling.prefix_index import PrefixIndex
from epp.scheduling.registry import PLUGINS
from epp.scheduling.request import CycleState, InferenceRequest
from epp.scheduling.services import Services

BLOCK = 16  # bytes per prefix block -> 4 tokens


def eps(n: int) -> list[Endpoint]:
    return [Endpoint(f"127.0.0.{i + 1}", 8000) for i in range(n)]


def services() -> Services:
    # tokenizer_fallback: the precise scorer runs on the approximate index here (no tokenizer)
    return Services(prefix_index=PrefixIndex(block_bytes=BLOCK), tokenizer_fallback=True)


def req(prompt: bytes = b"", **kw: Any) -> InferenceRequest:
    return InferenceRequest(
        request_id="r", model="m", prompt=prompt, prompt_tokens=max(1, len(prompt) // 4), **kw
    )


def score(
    cls: type[Scorer],
    endpoints: list[Endpoint],
    request: InferenceRequest | None = None,
    params: Mapping[str, Any] | None = None,
    svc: Services | None = None,
) -> list[float]:
    s = cls("", params, svc or services())
    return s.score(CycleState(), request or req(), endpoints)


def randomize(endpoints: list[Endpoint], rng: random.Random) -> None:
    for e in endpoints:
        e.metrics.waiting = rng.choice([0.0, 1.0, 3.0, 20.0])
        e.metrics.running = rng.choice([0.0, 4.0, 64.0])
        e.metrics.kv_usage = rng.choice([0.0, 0.3, 0.99, 1.2])
        e.inflight.requests = rng.randint(0, 10)
        e.inflight.tokens = rng.randint(0, 50_000)
        e.inflight.pending_requests = rng.randint(0, e.inflight.requests)
        e.inflight.pending_prefill_tokens = rng.randint(0, 5000)
        e.inflight.prefill_tokens = rng.choice([0, 3000])


SCORER_TYPES = sorted(name for name, cls in PLUGINS.items() if issubclass(cls, Scorer))


def test_registry_has_the_scorers_the_brief_requires() -> None:
    for name in (
        "queue-scorer",
        "kv-cache-utilization-scorer",
        "inflight-scorer",
        "prefix-cache-scorer",
        "session-affinity-scorer",
        "latency-scorer",
    ):
        assert name in SCORER_TYPES


@pytest.mark.parametrize("type_name", SCORER_TYPES)
@pytest.mark.parametrize("slo", [False, True])
def test_every_scorer_in_range_and_aligned(type_name: str, slo: bool) -> None:
    """Random states: one value per endpoint in [0, 1]; reversing the input reverses it."""
    cls = PLUGINS[type_name]
    assert issubclass(cls, Scorer)
    rng = random.Random(zlib.crc32(type_name.encode()))
    for trial in range(20):
        svc = services()
        endpoints = eps(rng.randint(1, 6))
        randomize(endpoints, rng)
        prompt = bytes(rng.choice(b"ab") for _ in range(rng.randint(0, 200)))
        for e in endpoints:
            if rng.random() < 0.5:
                cut = rng.randint(0, len(prompt))
                svc.prefix_index.insert(e, svc.prefix_index.hash_prompt("m", prompt[:cut]))
        slo_kw: dict[str, Any] = (
            {"slo_ttft_ms": rng.choice([50.0, 500.0]), "slo_tpot_ms": 20.0} if slo else {}
        )
        r = req(prompt, **slo_kw)
        scorer = cls("", None, svc)
        fwd = scorer.score(CycleState(), r, endpoints)
        assert len(fwd) == len(endpoints), trial
        assert all(0.0 <= v <= 1.0 for v in fwd), (trial, fwd)
        back = scorer.score(CycleState(), r, list(reversed(endpoints)))
        assert back == pytest.approx(list(reversed(fwd))), trial


def test_queue_scorer_prefers_short_queues() -> None:
    e = eps(3)
    e[0].metrics.waiting, e[1].metrics.waiting, e[2].metrics.waiting = 10, 0, 5
    assert score(QueueScorer, e) == pytest.approx([0.0, 1.0, 0.5])


def test_queue_scorer_counts_epp_pending_requests_before_the_scrape() -> None:
    e = eps(2)
    e[0].inflight.pending_requests = 4  # sent by us, not yet visible in scraped metrics
    s = score(QueueScorer, e)
    assert s[1] > s[0]


def test_queue_scorer_all_equal_is_neutral_high() -> None:
    assert score(QueueScorer, eps(3)) == [1.0, 1.0, 1.0]


def test_kv_scorer_prefers_free_cache_and_clamps() -> None:
    e = eps(4)
    for x, u in zip(e, [0.2, 0.9, 1.5, -0.1], strict=True):
        x.metrics.kv_usage = u
    assert score(KVCacheUtilizationScorer, e) == pytest.approx([0.8, 0.1, 0.0, 1.0])


def test_inflight_scorer_orders_by_requests_and_tokens() -> None:
    e = eps(3)
    for x, n in zip(e, [4, 0, 2], strict=True):
        x.inflight.requests = n
        x.inflight.tokens = n * 1000
    s = score(InFlightScorer, e)
    assert s[1] > s[2] > s[0]
    # Light load (below the floors): gentle differences, one request more is not a cliff.
    assert s[1] == pytest.approx(1.0) and s[0] > 0.5
    for x, n in zip(e, [40, 0, 20], strict=True):
        x.inflight.requests = n
        x.inflight.tokens = n * 1000
    s = score(InFlightScorer, e)
    # Heavy load: the busiest endpoint scores 0, the idle one 1.
    assert s[1] == pytest.approx(1.0) and s[0] == pytest.approx(0.0)
    assert s[2] == pytest.approx(0.5)


def test_inflight_scorer_token_load_breaks_request_ties() -> None:
    e = eps(2)
    for x in e:
        x.inflight.requests = 2
    e[0].inflight.tokens = 100_000  # same count, far heavier requests
    e[1].inflight.tokens = 1_000
    s = score(InFlightScorer, e)
    assert s[1] > s[0]


def test_inflight_scorer_sees_engine_load_we_did_not_send() -> None:
    e = eps(2)
    e[0].metrics.running, e[0].metrics.waiting = 30, 5  # another router's traffic
    s = score(InFlightScorer, e)
    assert s[1] > s[0]


def test_active_request_scorer_counts_requests() -> None:
    e = eps(3)
    for x, n in zip(e, [1, 3, 0], strict=True):
        x.inflight.requests = n
    s = score(ActiveRequestScorer, e)
    assert s[2] > s[0] > s[1]


def _prefix_setup(total: int, held: list[int]) -> tuple[Services, list[Endpoint], bytes]:
    svc = services()
    prompt = b"".join(bytes([65 + i]) * BLOCK for i in range(total))
    endpoints = eps(len(held))
    for e, n in zip(endpoints, held, strict=True):
        if n:
            svc.prefix_index.insert(e, svc.prefix_index.hash_prompt("m", prompt[: n * BLOCK]))
    return svc, endpoints, prompt


def test_prefix_scorer_ratio_and_absolute() -> None:
    svc, e, prompt = _prefix_setup(8, [4, 2, 0])
    r = req(prompt)
    # default: half ratio of the prompt, half relative to the best candidate
    assert score(PrefixCacheScorer, e, r, svc=svc) == pytest.approx([0.75, 0.375, 0.0])
    assert score(PrefixCacheScorer, e, r, {"absoluteWeight": 0}, svc) == pytest.approx(
        [0.5, 0.25, 0.0]
    )
    assert score(PrefixCacheScorer, e, r, {"absoluteWeight": 1}, svc) == pytest.approx(
        [1.0, 0.5, 0.0]
    )


def test_prefix_scorer_full_match_is_one_and_no_match_is_zero() -> None:
    svc, e, prompt = _prefix_setup(3, [3, 0])
    assert score(PrefixCacheScorer, e, req(prompt), svc=svc) == pytest.approx([1.0, 0.0])
    svc2, e2, _ = _prefix_setup(3, [0, 0])
    assert score(PrefixCacheScorer, e2, req(prompt), svc=svc2) == [0.0, 0.0]
    assert score(PrefixCacheScorer, e2, req(b"tiny"), svc=svc2) == [0.0, 0.0]


def test_session_affinity_remembers_via_on_picked() -> None:
    svc = services()
    scorer = SessionAffinityScorer("", None, svc)
    e = eps(3)
    r = req(b"x", session_key="s1")
    assert scorer.score(CycleState(), r, e) == [0.0, 0.0, 0.0]
    scorer.on_picked(CycleState(), r, SchedulingResult(primary=[e[2], e[0]]))
    assert scorer.score(CycleState(), r, e) == [0.0, 0.0, 1.0]
    # another session, or no session, is not affected
    assert scorer.score(CycleState(), req(b"x", session_key="s2"), e) == [0.0, 0.0, 0.0]
    assert scorer.score(CycleState(), req(b"x"), e) == [0.0, 0.0, 0.0]
    # a later pick moves the session
    scorer.on_picked(CycleState(), r, SchedulingResult(primary=[e[1]]))
    assert scorer.score(CycleState(), r, e) == [0.0, 1.0, 0.0]


def test_session_affinity_memory_is_bounded_lru() -> None:
    scorer = SessionAffinityScorer("", {"maxSessions": 2}, services())
    e = eps(1)
    for s in ("a", "b", "c"):
        scorer.on_picked(CycleState(), req(session_key=s), SchedulingResult(primary=e))
    assert scorer.score(CycleState(), req(session_key="a"), e) == [0.0]
    assert scorer.score(CycleState(), req(session_key="c"), e) == [1.0]


def test_latency_scorer_without_slo_prefers_idle_and_cached() -> None:
    svc, e, prompt = _prefix_setup(40, [0, 0, 40])  # 160-token prompt, cached on e[2]
    e[0].inflight.pending_prefill_tokens = 8000  # a long prefill queue
    s = score(LatencyScorer, e, req(prompt), svc=svc)
    assert s[2] == pytest.approx(1.0)
    assert s[2] > s[1] > s[0]


def test_latency_scorer_with_slo_meeting_endpoints_above_half() -> None:
    svc = services()
    e = eps(3)
    e[1].inflight.pending_prefill_tokens = 2_000  # ~500 ms of queued prefill at the prior
    e[2].inflight.pending_prefill_tokens = 40_000  # ~10 s
    r = req(b"p" * 400, slo_ttft_ms=1000.0)  # 100 tokens: ~55 ms on an idle endpoint
    s = score(LatencyScorer, e, r, svc=svc)
    assert s[0] > 0.5 and s[1] > 0.5, s
    assert s[2] < 0.5, s
    assert s[0] > s[1] > s[2]


def test_latency_scorer_tpot_slo_penalises_big_batches() -> None:
    e = eps(2)
    e[1].inflight.requests = 400  # a huge decode batch
    r = req(b"p" * 40, slo_tpot_ms=30.0)
    s = score(LatencyScorer, e, r)
    assert s[0] > 0.5 > s[1], s


# ---- delay-cost-scorer -----------------------------------------------------------------------
@pytest.fixture
def fake_clock() -> Iterator[list[float]]:
    from epp import clock

    now = [100.0]
    clock.set_clock(lambda: now[0])
    yield now
    clock.set_clock(None)


def _delay_cost_setup(clock: list[float], n: int = 2):  # type: ignore[no-untyped-def]
    from epp.scheduling.plugins.delay_cost_scorer import DelayCostScorer
    from epp.scheduling.services import Services

    services = Services()
    scorer = DelayCostScorer("dc", {}, services)
    eps = [Endpoint(f"10.0.0.{i}", 8000) for i in range(1, n + 1)]
    return scorer, services, eps, clock


def _req(prompt: bytes, rid: str = "r") -> InferenceRequest:
    return InferenceRequest(rid, "m", prompt=prompt, prompt_tokens=len(prompt) // 4)


def test_delay_cost_keeps_a_cached_prefix_until_its_queue_costs_more(
    fake_clock: list[float],
) -> None:
    scorer, services, (warm, cold), clock = _delay_cost_setup(fake_clock)
    system = b"s" * 8000  # ~2000 tokens
    services.prefix_index.insert(warm, services.prefix_index.hash_prompt("m", system))
    r = _req(system + b"q" * 240)
    scores = scorer.score(CycleState(), r, [warm, cold])
    assert scores[0] == 1.0 and scores[1] < 0.2
    # a long prefill queue on the warm pod (2 s of work) makes the cold pod cheaper
    services.latency.charge_backlog(warm, 8000, clock[0])
    scores = scorer.score(CycleState(), r, [warm, cold])
    assert scores[1] == 1.0 and scores[0] < 1.0
    # ...and the queue drains with time: after 3 s the warm pod is the choice again
    clock[0] += 3.0
    scores = scorer.score(CycleState(), r, [warm, cold])
    assert scores[0] == 1.0


def test_delay_cost_sends_new_prefixes_where_nothing_is_evicted(fake_clock: list[float]) -> None:
    scorer, services, (full, empty), _ = _delay_cost_setup(fake_clock)
    full.metrics.block_size, full.metrics.num_blocks = 16, 400  # 6400 tokens of KV
    empty.metrics.block_size, empty.metrics.num_blocks = 16, 400
    index = services.prefix_index
    index.insert(full, index.hash_prompt("m", b"x" * 25600))  # fills its 100 blocks
    scores = scorer.score(CycleState(), _req(b"new prompt " * 800), [full, empty])
    assert scores[1] == 1.0 and scores[0] < 1.0


def test_delay_cost_avoids_a_clearly_slower_pod(fake_clock: list[float]) -> None:
    scorer, _, (fast, slow), clock = _delay_cost_setup(fake_clock)
    # two scrapes each: 100 tokens decoded in a window with no prefill running there
    for ep in (fast, slow):
        m = ep.metrics
        m.tpot_sum, m.tpot_count, m.updated_at = 0.0, 0.0, clock[0]
        scorer.services.latency.refresh(ep, clock[0])
    clock[0] += 1.0
    for ep, tpot_s in ((fast, 0.012), (slow, 0.030)):
        m = ep.metrics
        m.tpot_sum, m.tpot_count, m.updated_at = 100 * tpot_s, 100.0, clock[0]
    scores = scorer.score(CycleState(), _req(b"hello " * 100), [fast, slow])
    assert scores[0] == 1.0 and scores[1] < 0.5
    assert slow.latency.decode_tpot_ms == pytest.approx(30.0)


def test_delay_cost_keeps_cold_prompts_off_pods_with_first_tokens_pending(
    fake_clock: list[float],
) -> None:
    """Two pods with the same queued prefill work and batch: on one the three requests are
    still waiting for their first token, on the other they decode. A new prompt on the
    first would share a prefill step with them and delay their first tokens; a tenant over
    its share (flow control marks it) is not steered away from them."""
    scorer, services, (waiting, decoding), clock = _delay_cost_setup(fake_clock)
    scorer = type(scorer)("dc", {"pendingWeight": 1}, services)
    for ep in (waiting, decoding):
        ep.inflight.requests = 3
        services.latency.charge_backlog(ep, 600, clock[0])
    waiting.inflight.pending_requests = 3
    r = _req(b"fresh prompt " * 600)
    scores = scorer.score(CycleState(), r, [waiting, decoding])
    assert scores[1] == 1.0 and scores[0] < 0.95, scores
    r.over_share = True
    assert scorer.score(CycleState(), r, [waiting, decoding]) == [1.0, 1.0]
    r.over_share = False
    default = type(scorer)("dc0", {}, services)  # off by default (bench/RESULTS.md §0)
    assert default.score(CycleState(), r, [waiting, decoding]) == [1.0, 1.0]


def test_delay_cost_rejects_negative_weights() -> None:
    from epp.scheduling.plugins.delay_cost_scorer import DelayCostScorer

    with pytest.raises(ValueError, match="workWeight"):
        DelayCostScorer("dc", {"workWeight": -1})
    with pytest.raises(ValueError, match="pendingWeight"):
        DelayCostScorer("dc", {"pendingWeight": -0.5})
