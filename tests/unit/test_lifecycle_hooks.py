"""Request-lifecycle hooks: named in the config, called exactly once per path, and the
scheduler computes only the data they consume."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint, InFlight
from epp.requestcontrol import registry
from epp.requestcontrol.config import build_request_control
from epp.requestcontrol.decision import Decision
from epp.requestcontrol.director import Director
from epp.requestcontrol.lifecycle import LifecycleHook
from epp.scheduling.config import ConfigError
from epp.scheduling.framework import PREDICTIONS, PREFIX_HASHES
from epp.scheduling.request import InferenceRequest

SCORERS_ONLY = """
plugins:
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"""


class Recorder(LifecycleHook):
    type_name = "test-recorder"

    def configure(self) -> None:
        self.calls: Counter[str] = Counter()

    def pre_request(self, d: Decision) -> None:
        self.calls["pre_request"] += 1

    def response_headers(self, d: Decision, status: int) -> None:
        self.calls[f"headers:{status}"] += 1

    def first_token(self, d: Decision, now: float, learn: bool) -> None:
        self.calls["first_token"] += 1

    def prefill_done(self, d: Decision) -> None:
        self.calls["prefill_done"] += 1

    def complete(self, d: Decision, output_tokens: int, now: float) -> None:
        self.calls["complete"] += 1

    def release(self, d: Decision) -> None:
        self.calls["release"] += 1


@pytest.fixture
def recorder_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.HOOKS, Recorder.type_name, Recorder)


def director_for(config: str | None) -> tuple[Director, list[Endpoint]]:
    ds = Datastore()
    pool = [Endpoint(f"127.0.0.{i}", 8000) for i in (1, 2)]
    for e in pool:
        ds.upsert_endpoint("test", e)
    rc = build_request_control(config)
    return Director(ds, rc.scheduler, hooks=rc.hooks, rng=random.Random(1)), pool


def request(i: int = 0, stream: bool = True) -> InferenceRequest:
    prompt = ("shared system prompt " * 60 + str(i)).encode()
    return InferenceRequest(
        f"r{i}", "m", prompt=prompt, prompt_tokens=len(prompt) // 4, stream=stream
    )


def hook_types(d: Director) -> list[str]:
    return [type(h).type_name for h in d.hooks]


def test_default_config_runs_the_default_hooks() -> None:
    d, _ = director_for(None)
    assert hook_types(d) == list(registry.DEFAULT_HOOKS)
    assert d.scheduler.outputs == {PREFIX_HASHES, PREDICTIONS}


def test_a_config_without_hooks_gets_the_defaults() -> None:
    d, _ = director_for(SCORERS_ONLY)
    assert hook_types(d) == list(registry.DEFAULT_HOOKS)


def test_naming_hooks_replaces_the_defaults_but_accounting_stays(
    recorder_registered: None,
) -> None:
    cfg = SCORERS_ONLY.replace(
        "plugins:\n- type: queue-scorer", "plugins:\n- type: test-recorder\n- type: queue-scorer", 1
    )
    d, pool = director_for(cfg)
    assert hook_types(d) == ["test-recorder", "inflight-accounting"]
    # nothing consumes the prefix hashes: the scheduler does not compute them, and no
    # prefix-index insert happens
    assert PREFIX_HASHES not in d.scheduler.outputs
    dec = d.admit(request())
    assert dec.result.prefix_hashes == []
    assert d.prefix_index.blocks_held(dec.target.key) == 0
    assert dec.target.inflight.requests == 1
    d.release(dec)
    assert all(e.inflight == InFlight() for e in pool)


def test_only_prefix_insert_named_skips_predictions() -> None:
    cfg = SCORERS_ONLY.replace(
        "plugins:\n- type: queue-scorer",
        "plugins:\n- type: prefix-cache-insert\n- type: queue-scorer",
        1,
    )
    d, _ = director_for(cfg)
    # in-flight accounting consumes predictions (the prefill timer), so they stay on
    assert d.scheduler.outputs == {PREFIX_HASHES, PREDICTIONS}
    dec = d.admit(request())
    assert dec.result.prefix_hashes
    assert d.prefix_index.blocks_held(dec.target.key) == len(dec.result.prefix_hashes)


def test_hook_parameters_and_duplicates_are_checked(recorder_registered: None) -> None:
    cfg = SCORERS_ONLY.replace(
        "plugins:\n- type: queue-scorer",
        "plugins:\n- type: test-recorder\n- type: test-recorder\n- type: queue-scorer",
        1,
    )
    with pytest.raises(ConfigError, match="defined twice"):
        build_request_control(cfg)


@pytest.mark.parametrize(
    "path",
    ["stream_ok", "nonstream_ok", "error_before_first_token", "timer_then_token", "double_release"],
)
def test_each_hook_method_is_called_at_most_once(recorder_registered: None, path: str) -> None:
    cfg = SCORERS_ONLY.replace(
        "plugins:\n- type: queue-scorer", "plugins:\n- type: test-recorder\n- type: queue-scorer", 1
    )
    d, pool = director_for(cfg)
    rec = next(h for h in d.hooks if isinstance(h, Recorder))
    dec = d.admit(request())
    if path == "stream_ok":
        d.response_headers(dec, 200)
        d.first_byte(dec, learn=True)
        d.first_byte(dec, learn=True)
        d.complete(dec, 10)
        d.release(dec)
    elif path == "nonstream_ok":
        d.response_headers(dec, 200)
        d.first_byte(dec, learn=False)
        d.complete(dec, 10)
        d.release(dec)
    elif path == "error_before_first_token":
        d.response_headers(dec, 503)
        d.release(dec)
        d.first_byte(dec)  # late signals after the end are ignored
        d.complete(dec, 3)
    elif path == "timer_then_token":
        d.prefill_elapsed(dec)
        d.first_byte(dec)
        d.release(dec)
    elif path == "double_release":
        d.release(dec)
        d.release(dec)
    assert rec.calls["pre_request"] == 1
    assert rec.calls["release"] == 1
    assert rec.calls["prefill_done"] == 1
    assert rec.calls["first_token"] <= 1
    assert rec.calls["complete"] <= 1
    assert all(e.inflight == InFlight() for e in pool)


def test_a_stream_closed_after_headers_keeps_its_charge_until_the_engine_drops_it() -> None:
    from epp import clock

    d, pool = director_for(None)
    for e in pool:
        e.metrics.updated_at = clock.now()  # the engines report their counts
    dec = d.admit(request())
    target = dec.target
    # the gateway closed the stream right after the response headers: still decoding
    delay = d.stream_closed(dec, response_started=True)
    assert delay > 0 and not dec.released and target.inflight.requests == 1
    # a scrape from before the deferral says nothing about it
    target.metrics.running, target.metrics.waiting = 0, 0
    target.metrics.updated_at = dec.deferred_at - 0.001
    d.reconcile(target)
    assert not dec.released
    # a later scrape that still counts it running keeps it
    target.metrics.running, target.metrics.updated_at = 1, clock.now() + 0.01
    d.reconcile(target)
    assert not dec.released
    # the engine no longer has it (the client went away, or it ended early): released
    target.metrics.running, target.metrics.updated_at = 0, clock.now() + 0.02
    d.reconcile(target)
    assert dec.released and all(e.inflight == InFlight() for e in pool)
    d.release(dec)  # the timer firing later changes nothing
    assert all(e.inflight == InFlight() for e in pool)


def test_an_error_or_an_ended_response_releases_at_once() -> None:
    d, pool = director_for(None)
    dec = d.admit(request())
    assert d.stream_closed(dec, response_started=False) == 0.0
    assert dec.released
    # a non-streamed answer's response headers come with its end
    dec = d.admit(request(stream=False))
    assert d.stream_closed(dec, response_started=True) == 0.0
    assert dec.released
    # an endpoint that reports no counts: nothing could correct a guess
    for e in pool:
        e.metrics.updated_at = 0.0
    dec = d.admit(request())
    assert d.stream_closed(dec, response_started=True) == 0.0
    assert all(e.inflight == InFlight() for e in pool)
