"""The P/D decision and its reason (pd-profile-handler policies), and the bench variant that
always disaggregates staying the default config otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from epp import clock
from epp.datalayer.endpoint import Endpoint
from epp.scheduling.config import DEFAULT_CONFIG, ConfigError, build_scheduler
from epp.scheduling.request import InferenceRequest
from epp.scheduling.scheduler import Scheduler
from epp.scheduling.services import Services

ROOT = Path(__file__).resolve().parents[2]
LONG = 16_000  # bytes: ~4000 tokens
SHORT = 200  # bytes: ~50 tokens


def ep(n: int, role: str) -> Endpoint:
    return Endpoint(f"127.0.0.{n}", 8000, role=role)


def req(size: int, seed: str = "x") -> InferenceRequest:
    prompt = (seed * size).encode()[:size]
    return InferenceRequest(request_id="r", model="m", prompt=prompt, prompt_tokens=size // 4)


def scheduler(policy: str | None = None, config: str = DEFAULT_CONFIG) -> Scheduler:
    doc: dict[str, Any] = yaml.safe_load(config)
    if policy is not None:
        for p in doc["plugins"]:
            if p["type"] == "pd-profile-handler":
                p["parameters"] = {"policy": policy}
    return build_scheduler(yaml.safe_dump(doc), services=Services())


def test_long_fresh_prompt_disaggregates_because_remote_is_faster() -> None:
    decode, prefill = ep(1, "decode"), ep(2, "prefill")
    res = scheduler().schedule(req(LONG), [decode, prefill])
    assert res.prefill is prefill and res.pd is not None
    assert (res.pd.decision, res.pd.reason) == ("disaggregated", "remote-faster")
    assert res.pd.remote_ms is not None and res.pd.local_ms is not None
    assert res.pd.remote_ms < res.pd.local_ms
    assert res.pd.local_uncached == res.pd.remote_uncached == LONG // 4


def test_short_prompt_is_local_below_threshold() -> None:
    res = scheduler().schedule(req(SHORT), [ep(1, "decode"), ep(2, "prefill")])
    assert res.prefill is None and res.pd is not None
    assert (res.pd.decision, res.pd.reason) == ("local", "below-threshold")


def test_a_medium_prompt_leaves_a_busy_decode_pod_but_stays_on_a_quiet_one() -> None:
    # 150 uncached tokens: prefilled locally they stall every stream decoding there, so the
    # cost grows with the batch; with one stream there, waiting behind the prefill pod's
    # short queue is not worth it, with forty it is.
    medium = 600  # bytes: ~150 tokens
    for running, expected in ((0.0, "local-faster"), (40.0, "remote-faster")):
        decode, prefill = ep(1, "decode"), ep(2, "prefill")
        decode.metrics.running = running
        prefill.queue.backlog_tokens = 200
        prefill.queue.backlog_at = clock.now()
        res = scheduler().schedule(req(medium), [decode, prefill])
        assert res.pd is not None and res.pd.reason == expected, (running, res.pd)
        assert (res.prefill is prefill) == (expected == "remote-faster")
        assert res.pd.local_uncached == medium // 4


def test_busy_prefill_pods_keep_a_long_prompt_local() -> None:
    decode, prefill = ep(1, "decode"), ep(2, "prefill")
    prefill.queue.backlog_tokens = 50_000  # a long prefill queue there
    prefill.queue.backlog_at = clock.now()
    res = scheduler().schedule(req(LONG), [decode, prefill])
    assert res.prefill is None and res.pd is not None
    assert (res.pd.decision, res.pd.reason) == ("local", "local-faster")
    assert res.pd.remote_ms is not None and res.pd.local_ms is not None
    assert res.pd.remote_ms >= res.pd.local_ms
    # The threshold rule (the other routers') does not look: it disaggregates anyway.
    res = scheduler("threshold").schedule(req(LONG), [decode, prefill])
    assert res.prefill is prefill and res.pd is not None
    assert res.pd.reason == "over-threshold"


def test_always_policy_disaggregates_even_a_short_prompt() -> None:
    decode, prefill = ep(1, "decode"), ep(2, "prefill")
    res = scheduler("always").schedule(req(SHORT), [decode, prefill])
    assert res.prefill is prefill and res.pd is not None
    assert (res.pd.decision, res.pd.reason) == ("disaggregated", "always")
    assert res.uncached_tokens == SHORT // 4  # now counted on the prefill pod


def test_no_prefill_pod_or_profile_is_a_local_decision_with_its_reason() -> None:
    res = scheduler("always").schedule(req(LONG), [ep(1, "decode"), ep(3, "decode")])
    assert res.pd is not None and (res.pd.decision, res.pd.reason) == (
        "local", "no-prefill-endpoint")
    decode_only = """
plugins: [{type: decode-filter}, {type: max-score-picker}, {type: pd-profile-handler}]
schedulingProfiles:
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: max-score-picker}]
"""
    res = scheduler(config=decode_only).schedule(req(LONG), [ep(1, "decode"), ep(2, "prefill")])
    assert res.prefill is None and res.pd is not None
    assert res.pd.reason == "no-prefill-profile"


def test_single_profile_pools_carry_no_pd_decision() -> None:
    single = """
plugins: [{type: max-score-picker}]
schedulingProfiles:
- name: default
  plugins: [{pluginRef: max-score-picker}]
"""
    res = scheduler(config=single).schedule(req(LONG), [ep(1, "")])
    assert res.pd is None


def test_unknown_policy_is_a_config_error() -> None:
    with pytest.raises((ConfigError, ValueError), match="policy"):
        scheduler("sometimes")


def test_pd_always_bench_variant_is_the_default_config_but_the_policy() -> None:
    variant = yaml.safe_load(
        (ROOT / "bench" / "scenarios" / "epp_configs" / "pd-always.yaml").read_text())
    default = yaml.safe_load(DEFAULT_CONFIG)
    for p in variant["plugins"]:
        if p["type"] == "pd-profile-handler":
            assert p.pop("parameters") == {"policy": "always"}
    assert variant == default


def test_both_role_pods_take_no_prefill_hop_unless_asked() -> None:
    a, b = ep(1, "both"), ep(2, "both")
    res = scheduler().schedule(req(LONG), [a, b])
    assert res.prefill is None and res.pd is not None
    assert res.pd.reason == "no-prefill-endpoint"
    doc: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG)
    for p in doc["plugins"]:
        if p["type"] == "pd-profile-handler":
            p["parameters"] = {"bothRolePodsPrefill": True}
    res = build_scheduler(yaml.safe_dump(doc), services=Services()).schedule(req(LONG), [a, b])
    assert res.pd is not None and res.pd.reason in ("remote-faster", "local-faster")


def test_a_prompt_whose_kv_is_still_in_transit_is_not_counted_on_the_decode_pod() -> None:
    """The first request of a group prefills remotely; the decode pod holds the prompt's KV
    only once that prefill is done (its first token). A second request of the group in
    between must not be prefilled locally as if the prefix were there: the engine would
    compute all of it again, in front of the decodes waiting for their KV."""
    import random

    from epp.datalayer.datastore import Datastore
    from epp.requestcontrol.config import build_request_control
    from epp.requestcontrol.director import Director

    ds = Datastore()
    decode, prefill = ep(1, "decode"), ep(2, "prefill")
    for e in (decode, prefill):
        ds.upsert_endpoint("t", e)
    rc = build_request_control(None)
    d = Director(ds, rc.scheduler, hooks=rc.hooks, rng=random.Random(1))
    system = "s" * LONG  # ~4000 tokens shared by the group

    def ask(i: int) -> InferenceRequest:
        prompt = (system + f" question {i}").encode()
        return InferenceRequest(f"r{i}", "m", prompt=prompt, prompt_tokens=len(prompt) // 4)

    first = d.admit(ask(1))
    assert first.result.prefill is prefill
    second = d.admit(ask(2))
    pd = second.result.pd
    assert pd is not None and pd.local_uncached > LONG // 4 - 100, pd  # not the ~4 fresh ones
    d.first_byte(first)  # the KV has landed on the decode pod
    d.first_byte(second)
    third = d.admit(ask(3))
    pd = third.result.pd
    assert pd is not None and pd.local_uncached < 100 and third.result.prefill is None, pd
    for dec in (first, second, third):
        d.release(dec)
    assert not ds_in_transit(rc)


def ds_in_transit(rc: Any) -> dict[str, Any]:
    return dict(rc.scheduler.services.prefix_index._in_transit)
