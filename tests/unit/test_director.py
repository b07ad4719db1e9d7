"""Director: model resolution, candidates, admission and pick-time accounting that never leaks."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable

import pytest

from epp.datalayer.datastore import Criticality, Datastore, ModelInfo, Objective, TargetModel
from epp.datalayer.endpoint import Endpoint, InFlight
from epp.requestcontrol.director import Decision, Director, DirectorSettings
from epp.requestcontrol.errors import RequestError
from epp.scheduling.config import build_scheduler
from epp.scheduling.request import InferenceRequest

LONG = 16_000  # bytes, ~4000 tokens: the default P/D handler sends it to a prefill pod
SHORT = 200


def ep(n: int, model: str = "m", role: str = "", ready: bool = True) -> Endpoint:
    return Endpoint(f"127.0.0.{n}", 8000, model=model, role=role, ready=ready)


def make(
    endpoints: list[Endpoint],
    settings: DirectorSettings | None = None,
    seed: int = 1,
    on_pick: Callable[[Decision], None] | None = None,
) -> tuple[Director, Datastore]:
    ds = Datastore()
    for e in endpoints:
        ds.upsert_endpoint("test", e)
    return Director(
        ds, build_scheduler(None), settings, rng=random.Random(seed), on_pick=on_pick
    ), ds


def req(size: int = SHORT, model: str = "m", seed: str = "x", **kw: object) -> InferenceRequest:
    prompt = (seed * size).encode()[:size]
    r = InferenceRequest(request_id="r", model=model, prompt=prompt, prompt_tokens=size // 4)
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def status_of(fn: Callable[[], object]) -> int:
    with pytest.raises(RequestError) as ei:
        fn()
    return ei.value.status


def all_zero(endpoints: list[Endpoint]) -> None:
    for e in endpoints:
        assert e.inflight == InFlight(), (e.key, e.inflight)


# ---- accounting ---------------------------------------------------------------------------
def test_admit_charges_in_flight_at_pick_time() -> None:
    pool = [ep(1), ep(2)]
    d, _ = make(pool)
    r = req(SHORT, max_tokens=100)
    dec = d.admit(r)
    inf = dec.target.inflight
    assert inf.requests == 1
    assert inf.tokens == r.prompt_tokens + 100
    assert inf.pending_requests == 1
    assert inf.pending_prefill_tokens == dec.result.uncached_tokens == r.prompt_tokens
    other = pool[1] if dec.target is pool[0] else pool[0]
    assert other.inflight == InFlight()
    # the next request sees the charge immediately and goes to the other endpoint
    assert d.admit(req(SHORT, seed="y")).target is other


def test_admit_inserts_prompt_into_prefix_index() -> None:
    d, _ = make([ep(1), ep(2)])
    r = req(4000, seed="sys prompt ")
    dec = d.admit(r)
    assert dec.result.prefix_hashes
    assert d.prefix_index.match(dec.result.prefix_hashes) == {
        dec.target.key: len(dec.result.prefix_hashes)
    }


ORDERS: list[list[str]] = [
    ["release"],
    ["first_byte", "release"],
    ["first_byte", "complete", "release"],
    ["first_byte", "complete", "release", "release"],
    ["prefill_elapsed", "first_byte", "complete", "release"],
    ["prefill_elapsed", "release", "first_byte", "prefill_elapsed"],
    ["complete", "release"],
    ["release", "first_byte", "complete", "prefill_elapsed", "release"],
    ["first_byte_nolearn", "first_byte", "release"],
]


def _step(d: Director, dec: Decision, step: str) -> None:
    now = time.monotonic()
    if step == "release":
        d.release(dec)
    elif step == "first_byte":
        d.first_byte(dec, now + 0.05)
    elif step == "first_byte_nolearn":
        d.first_byte(dec, now + 0.05, learn=False)
    elif step == "prefill_elapsed":
        d.prefill_elapsed(dec)
    elif step == "complete":
        d.complete(dec, 20, now + 0.3)
    else:
        raise AssertionError(step)


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
@pytest.mark.parametrize("pd", [False, True], ids=["single", "pd"])
def test_release_returns_counters_to_zero(order: list[str], pd: bool) -> None:
    pool = [ep(1, role="decode"), ep(2, role="prefill")] if pd else [ep(1), ep(2)]
    d, _ = make(pool)
    dec = d.admit(req(LONG if pd else SHORT))
    if pd:
        assert dec.result.prefill is pool[1]
        pf = pool[1].inflight
        assert pf.prefill_requests == 1
        assert pf.prefill_tokens == dec.result.uncached_tokens > 0
        assert pf.requests == 0  # the prefill hop is not a decode request
        assert pool[0].inflight.pending_prefill_tokens == 0
    for step in order:
        _step(d, dec, step)
    all_zero(pool)
    assert dec.released


def test_release_none_is_a_noop() -> None:
    d, _ = make([ep(1)])
    d.release(None)


def test_interleaved_decisions_never_leak() -> None:
    rng = random.Random(5)
    pool = [ep(1, role="decode"), ep(2, role="decode"), ep(3, role="prefill"), ep(4, role="both")]
    d, _ = make(pool)
    live: list[tuple[Decision, list[str]]] = []
    saw_prefill = False
    for i in range(200):
        if rng.random() < 0.6 or not live:
            size = rng.choice([SHORT, LONG, 3000])
            dec = d.admit(req(size, seed=f"{i} "))
            saw_prefill |= dec.result.prefill is not None
            live.append((dec, list(rng.choice(ORDERS))))
        dec, steps = live[rng.randrange(len(live))]
        _step(d, dec, steps.pop(0))
        live = [(x, s) for x, s in live if s]
    for dec, steps in live:
        for step in steps:
            _step(d, dec, step)
    assert saw_prefill
    all_zero(pool)


def test_first_byte_learns_ttft_only_when_asked() -> None:
    d, _ = make([ep(1)])
    dec = d.admit(req())
    d.first_byte(dec, dec.started + 0.05, learn=False)
    assert dec.target.latency.samples == 0
    d.release(dec)
    dec2 = d.admit(req())
    d.first_byte(dec2, dec2.started + 0.05)
    assert dec2.target.latency.samples == 1
    d.release(dec2)


def test_on_pick_callback_sees_every_decision() -> None:
    seen: list[Decision] = []
    d, _ = make([ep(1)], on_pick=seen.append)
    dec = d.admit(req())
    assert seen == [dec]


# ---- errors ---------------------------------------------------------------------------------
def test_unknown_model_is_404() -> None:
    d, _ = make([ep(1, model="a"), ep(2, model="b")])
    assert status_of(lambda: d.admit(req(model="c"))) == 404
    assert d.admit(req(model="a")).target.model == "a"


def test_unlabelled_endpoints_serve_any_model() -> None:
    d, _ = make([ep(1, model="")])
    assert d.admit(req(model="whatever")).target.key == "127.0.0.1:8000"


def test_no_ready_endpoint_is_503() -> None:
    pool = [ep(1, ready=False), ep(2, ready=False)]
    d, _ = make(pool)
    assert status_of(lambda: d.admit(req())) == 503
    all_zero(pool)


def test_only_prefill_pods_is_503() -> None:
    d, _ = make([ep(1, role="prefill")])
    assert status_of(lambda: d.admit(req())) == 503


def test_subset_hint_restricts_and_empty_subset_is_503() -> None:
    pool = [ep(1), ep(2), ep(3)]
    d, _ = make(pool)
    for _ in range(6):
        dec = d.admit(req(subset=frozenset({pool[2].key})))
        assert dec.target is pool[2]
    empty: frozenset[str] = frozenset()
    assert status_of(lambda: d.admit(req(subset=empty))) == 503
    assert status_of(lambda: d.admit(req(subset=frozenset({"10.0.0.1:8000"})))) == 503
    pool[2].ready = False
    assert status_of(lambda: d.admit(req(subset=frozenset({pool[2].key})))) == 503


def _saturate(e: Endpoint) -> None:
    e.metrics.waiting = 50
    e.metrics.kv_usage = 0.95
    e.metrics.updated_at = time.monotonic()


def test_sheddable_request_on_saturated_pool_is_429() -> None:
    pool = [ep(1), ep(2)]
    d, ds = make(pool)
    ds.replace_objectives([Objective("batch", -1), Objective("interactive", 5)])
    for e in pool:
        _saturate(e)
    sheddable = req()
    d.apply_headers(sheddable, {"x-gateway-inference-objective": "batch"})
    assert sheddable.priority == -1
    assert status_of(lambda: d.admit(sheddable)) == 429
    all_zero(pool)
    # a non-sheddable request is still admitted (the engines queue it)
    normal = req()
    d.apply_headers(normal, {"x-gateway-inference-objective": "interactive"})
    assert normal.priority == 5
    d.release(d.admit(normal))
    # one unsaturated endpoint: the pool is not saturated
    pool[1].metrics.waiting = 0
    d.release(d.admit(sheddable))
    all_zero(pool)


def test_stale_metrics_do_not_shed() -> None:
    pool = [ep(1)]
    d, _ = make(pool)
    _saturate(pool[0])
    pool[0].metrics.updated_at = time.monotonic() - 60
    d.release(d.admit(req(priority=-1)))


def test_epp_inflight_limit_saturates() -> None:
    pool = [ep(1)]
    settings = DirectorSettings()
    settings.saturation.max_inflight_per_endpoint = 2
    d, _ = make(pool, settings)
    a, b = d.admit(req(priority=-1)), d.admit(req(priority=-1))
    assert status_of(lambda: d.admit(req(priority=-1))) == 429
    c = d.admit(req(priority=0))  # not sheddable: admitted
    d.release(a)
    assert status_of(lambda: d.admit(req(priority=-1))) == 429  # b and c still in flight
    d.release(c)
    d.release(d.admit(req(priority=-1)))
    d.release(b)
    all_zero(pool)


def test_sheddable_criticality_from_inference_model() -> None:
    pool = [ep(1)]
    d, ds = make(pool)
    ds.replace_models("test", [ModelInfo("m", Criticality.SHEDDABLE)])
    _saturate(pool[0])
    assert status_of(lambda: d.admit(req())) == 429
    ds.replace_models("test", [ModelInfo("m", Criticality.CRITICAL)])
    r = req()
    d.admit(r)
    assert r.priority == 1


# ---- model rewrite and headers ------------------------------------------------------------
def test_weighted_target_rewrite_distributes_by_weight() -> None:
    pool = [ep(1, model="llama-a"), ep(2, model="llama-b"), ep(3, model="llama-b")]
    d, ds = make(pool, seed=3)
    ds.replace_models(
        "test",
        [ModelInfo("chat", target_models=(TargetModel("llama-a", 80), TargetModel("llama-b", 20)))],
    )
    counts: Counter[str] = Counter()
    n = 2000
    for _ in range(n):
        r = req(model="chat")
        dec = d.admit(r)
        assert dec.rewritten_model in ("llama-a", "llama-b")
        assert r.target_model == dec.rewritten_model == r.routed_model
        assert dec.target.model == dec.rewritten_model  # routed to a pod serving the target
        assert r.model == "chat"
        counts[dec.rewritten_model] += 1
        d.release(dec)
    assert counts["llama-a"] / n == pytest.approx(0.8, abs=0.04)
    all_zero(pool)


def test_zero_weight_target_never_chosen() -> None:
    pool = [ep(1, model="a"), ep(2, model="b")]
    d, ds = make(pool, seed=4)
    ds.replace_models(
        "test", [ModelInfo("chat", target_models=(TargetModel("a", 0), TargetModel("b", 3)))]
    )
    for _ in range(200):
        dec = d.admit(req(model="chat"))
        assert dec.rewritten_model == "b"
        d.release(dec)


def test_target_equal_to_model_is_not_a_rewrite() -> None:
    d, ds = make([ep(1, model="m")])
    ds.replace_models("test", [ModelInfo("m", target_models=(TargetModel("m", 1),))])
    dec = d.admit(req())
    assert dec.rewritten_model is None and dec.request.target_model == ""


def test_model_rewrite_header_wins_over_inference_model() -> None:
    d, ds = make([ep(1, model="a"), ep(2, model="z")])
    ds.replace_models("test", [ModelInfo("m", target_models=(TargetModel("a", 1),))])
    r = req()
    d.apply_headers(r, {"x-gateway-model-name-rewrite": "z"})
    dec = d.admit(r)
    assert dec.rewritten_model == "z" and dec.target.model == "z"


def test_no_passthrough_makes_undefined_models_404() -> None:
    settings = DirectorSettings(model_passthrough=False)
    d, ds = make([ep(1, model="")], settings)
    d.release(d.admit(req(model="anything")))  # no definitions at all: served
    ds.replace_models("test", [ModelInfo("chat")])
    assert status_of(lambda: d.admit(req(model="anything"))) == 404
    d.admit(req(model="chat"))


def test_apply_headers() -> None:
    d, ds = make([ep(1)])
    ds.replace_objectives([Objective("batch", -2)])
    r = req()
    d.apply_headers(
        r,
        {
            "x-business": "team-a",
            "x-session-id": "s-1",
            "x-slo-ttft-ms": "250",
            "x-slo-tpot-ms": "20.5",
            "x-gateway-inference-objective": "batch",
        },
    )
    assert (r.business, r.session_key, r.slo_ttft_ms, r.slo_tpot_ms, r.priority) == (
        "team-a",
        "s-1",
        250.0,
        20.5,
        -2,
    )
    bad = req()
    bad.session_key = "from-user-field"
    d.apply_headers(
        bad,
        {
            "x-slo-ttft-ms": "fast",
            "x-slo-tpot-ms": "-3",
            "x-gateway-inference-objective": "nope",
            "x-business": "",
        },
    )
    assert (bad.slo_ttft_ms, bad.slo_tpot_ms, bad.priority, bad.business) == (None, None, 0, None)
    assert bad.session_key == "from-user-field"  # no header: the body's user field stays


def test_objective_priority_not_overridden_by_criticality() -> None:
    d, ds = make([ep(1)])
    ds.replace_objectives([Objective("batch", -1)])
    ds.replace_models("test", [ModelInfo("m", Criticality.CRITICAL)])
    r = req()
    d.apply_headers(r, {"x-gateway-inference-objective": "batch"})
    d.admit(r)
    assert r.priority == -1


def test_removed_endpoint_leaves_the_prefix_index() -> None:
    pool = [ep(1)]
    d, ds = make(pool)
    dec = d.admit(req(4000, seed="abc "))
    assert d.prefix_index.blocks_held(pool[0].key) > 0
    d.release(dec)
    ds.remove_endpoint(pool[0].key)
    assert d.prefix_index.blocks_held(pool[0].key) == 0
    assert d.prefix_index.match(dec.result.prefix_hashes) == {}


def test_pick_any_prefers_least_loaded_decode_capable_ready() -> None:
    pool = [ep(1), ep(2, role="prefill"), ep(3, ready=False), ep(4)]
    d, _ = make(pool)
    pool[0].inflight.requests = 3
    for _ in range(10):
        assert d.pick_any("r") is pool[3]
    only_bad = [ep(1, role="prefill"), ep(2, ready=False)]
    d2, _ = make(only_bad)
    assert status_of(lambda: d2.pick_any("r")) == 503


def test_objective_with_priority_zero_is_not_replaced_by_criticality() -> None:
    """An explicit objective wins even when its priority is 0 (Standard)."""
    pool = [ep(1)]
    d, ds = make(pool)
    ds.replace_objectives([Objective("standard", 0)])
    ds.replace_models("test", [ModelInfo("m", Criticality.SHEDDABLE)])
    _saturate(pool[0])
    r = req()
    d.apply_headers(r, {"x-gateway-inference-objective": "standard"})
    dec = d.admit(r)  # not shed: the objective says Standard
    assert r.priority == 0
    d.release(dec)
    # without the header the model's criticality applies
    assert status_of(lambda: d.admit(req())) == 429


def test_non_finite_slo_headers_are_ignored() -> None:
    """`x-slo-ttft-ms: inf` from a client must not turn scores into NaN (it made the picker
    fail and the request a 500)."""
    pool = [ep(1), ep(2)]
    d, _ = make(pool)
    for value in ("inf", "Infinity", "1e999", "nan"):
        r = req()
        d.apply_headers(r, {"x-slo-ttft-ms": value, "x-slo-tpot-ms": value})
        assert (r.slo_ttft_ms, r.slo_tpot_ms) == (None, None), value
        d.release(d.admit(r))
    all_zero(pool)
