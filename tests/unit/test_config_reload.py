"""Config reload at run time: a good file is swapped in atomically, requests in flight keep
their hooks, a bad file keeps the running config and is counted as an error."""

from __future__ import annotations

import argparse
import logging
import os
import random
from pathlib import Path

import pytest
import yaml

from epp.config_reload import ConfigFileWatcher
from epp.datalayer.endpoint import Endpoint, InFlight
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.config import build_request_control
from epp.requestcontrol.director import Decision, Director, Ticket
from epp.scheduling.config import DEFAULT_CONFIG
from epp.scheduling.request import InferenceRequest
from epp.serve import App, add_arguments

FLOW_ON = yaml.safe_dump(
    {
        **yaml.safe_load(DEFAULT_CONFIG),
        "featureGates": ["flowControl"],
        "flowControl": {
            "saturationDetector": {"maxConcurrency": 1},
            "defaultPriorityBand": {"fairnessPolicyRef": "round-robin-fairness-policy"},
        },
    }
)
FLOW_OFF = yaml.safe_dump({**yaml.safe_load(DEFAULT_CONFIG), "featureGates": ["flowControl=false"]})


def app_with(path: Path, text: str) -> App:
    p = argparse.ArgumentParser()
    add_arguments(p)
    path.write_text(text)
    app = App(p.parse_args(["--config-file", str(path), "--endpoint", "127.0.0.1:1"]))
    app.metrics = EppMetrics()
    rc = build_request_control(text)
    app.director = Director(
        app.datastore, rc.scheduler, hooks=rc.hooks, flow_control=rc.flow_control,
        rng=random.Random(1),
    )  # fmt: skip
    for i in (1, 2):
        app.datastore.upsert_endpoint("test", Endpoint(f"127.0.0.{i}", 8000))
    return app


def reloads(app: App) -> dict[str, float]:
    assert app.metrics is not None
    out: dict[str, float] = {}
    for fam in app.metrics.registry.collect():
        for sample in fam.samples:
            if sample.name == "epp_config_reload_total":
                out[sample.labels["result"]] = sample.value
    return out


def req(rid: str) -> InferenceRequest:
    return InferenceRequest(rid, "m", prompt=rid.encode() * 10, prompt_tokens=5)


def test_good_config_swaps_and_in_flight_requests_keep_their_hooks(tmp_path: Path) -> None:
    app = app_with(tmp_path / "epp.yaml", FLOW_OFF)
    d = app.director
    assert d is not None and d.flow is None
    before = d.submit(req("a"))
    assert isinstance(before, Decision)
    old_scheduler, old_hooks = d.scheduler, before.hook_set
    assert app.reload_config(FLOW_ON)
    assert d.scheduler is not old_scheduler and d.flow is not None
    assert d.scheduler.services is old_scheduler.services  # learned state survives
    assert reloads(app) == {"success": 1}
    # flow control is now on: one in flight per pod
    second = d.submit(req("b"))
    assert isinstance(second, Decision) and second.hook_set is not old_hooks
    queued = d.submit(req("c"))
    assert isinstance(queued, Ticket)
    done: list[Ticket] = []
    queued.on_done = done.append
    d.release(before)  # released by the hooks it started with, and it frees a slot
    assert before.hook_set is old_hooks and done == [queued]
    assert queued.decision is not None
    d.release(second)
    d.release(queued.decision)
    for ep in d.datastore.endpoints():
        assert ep.inflight == InFlight()


def test_bad_config_keeps_the_running_one_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_with(tmp_path / "epp.yaml", FLOW_ON)
    d = app.director
    assert d is not None
    scheduler, flow = d.scheduler, d.flow
    bad = FLOW_ON.replace("maxConcurrency", "maxConcurency")
    with caplog.at_level(logging.ERROR):
        assert not app.reload_config(bad)
        assert not app.reload_config("plugins: [{type: no-such-scorer}]")
        assert not app.reload_config("{not yaml")
    assert d.scheduler is scheduler and d.flow is flow
    assert reloads(app) == {"error": 3}
    msgs = [r.getMessage() for r in caplog.records]
    assert any("keeping the running config" in m and "maxConcurency" in m for m in msgs)
    assert any("no-such-scorer" in m for m in msgs)


def test_watcher_applies_changed_content_once_it_stopped_changing(tmp_path: Path) -> None:
    path = tmp_path / "epp.yaml"
    path.write_text("v1")
    seen: list[str] = []

    def apply(text: str) -> bool:
        seen.append(text)
        return not text.startswith("bad")

    w = ConfigFileWatcher(str(path), apply, interval=1, initial_text="v1")
    assert not w.check() and not w.check()  # unchanged
    path.write_text("v2 longer")
    assert not w.check()  # changed: wait a poll for the writer to finish
    assert w.check() and seen == ["v2 longer"]
    assert not w.check()
    path.write_text("bad one")
    w.check()
    assert not w.check() and seen[-1] == "bad one"
    for _ in range(12):  # the same bad content is not retried on every poll
        w.check()
    assert seen.count("bad one") == 1
    # same size and mtime (coarse clocks): the periodic content hash still sees it
    st = path.stat()
    path.write_text("bad two")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    for _ in range(6):
        w.check()
    assert seen[-1] == "bad two"
    path.unlink()
    assert not w.check()
    path.write_text("v3")
    assert w.check(force=True) and seen[-1] == "v3"  # SIGHUP: at once


def test_a_reload_sets_the_latency_priors_and_a_bad_one_keeps_them(tmp_path: Path) -> None:
    app = app_with(tmp_path / "epp.yaml", FLOW_OFF)
    d = app.director
    assert d is not None
    model = d.scheduler.services.latency
    slower = yaml.safe_dump({**yaml.safe_load(FLOW_OFF), "latencyPriors": {"decodeMsPerToken": 30}})
    assert app.reload_config(slower)
    assert d.scheduler.services.latency is model and model.priors.tpot_ms == 30.0
    assert not app.reload_config(slower.replace("decodeMsPerToken", "decodeMsPerTokn"))
    assert model.priors.tpot_ms == 30.0
    assert reloads(app) == {"success": 1, "error": 1}
