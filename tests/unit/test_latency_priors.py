"""`latencyPriors:` in the config: the latency model's speeds before a pod is measured, the
prefill/decode ratio every measured speed is read against, and a reload that keeps what the
fleet taught the model."""

from __future__ import annotations

import logging

import pytest

from epp import clock
from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.config import build_request_control
from epp.requestcontrol.director import Director
from epp.scheduling.config import ConfigError
from epp.scheduling.latency_model import LatencyPriors
from epp.scheduling.services import Services
from tests.unit.test_scheduling_latency import _scrape as scrape

SLOW_POOL = """
latencyPriors:
  prefillTokensPerSecond: 2000
  decodeMsPerToken: 24
"""


def measured_at(services: Services, e: Endpoint, tpot_ms: float) -> None:
    """One clean scrape window in which `e` decoded 100 tokens at `tpot_ms` each."""
    model = services.latency
    scrape(e, 100.0, 0.0, 0.0)
    model.refresh(e, 100.0)
    scrape(e, 101.0, 100.0, tpot_ms / 10.0)
    model.refresh(e, 101.0)


def test_an_unmeasured_pod_is_predicted_at_the_configured_speeds() -> None:
    default, slow = Services(), Services()
    build_request_control(None, services=default)
    build_request_control(SLOW_POOL, services=slow)
    e = Endpoint("127.0.0.2", 8000)
    assert slow.latency.prefill_tokens_per_s(e, 10.0) == 2000.0
    assert default.latency.prefill_tokens_per_s(e, 10.0) == 4000.0
    assert slow.latency.decode_time_s(e, 100, 10.0) == pytest.approx(2.4)
    # 4000 uncached tokens sent: a second later the default thinks them done, the slow
    # pool's priors leave half of them queued ahead of the next request
    on_default, on_slow = Endpoint("127.0.0.3", 8000), Endpoint("127.0.0.4", 8000)
    default.latency.charge_backlog(on_default, 4000, 10.0)
    slow.latency.charge_backlog(on_slow, 4000, 10.0)
    assert default.latency.queue(on_default, 11.0).backlog_tokens == 0.0
    assert slow.latency.queue(on_slow, 11.0).backlog_tokens == pytest.approx(2000.0)


def test_a_measured_pod_prefills_at_the_configured_ratio() -> None:
    """The engines report decode speed only; prefill speed is the priors' scaled by it. A
    GPU that prefills 4x faster per decode step than the default pair says so here."""
    default, fast_prefill = Services(), Services()
    build_request_control(None, services=default)
    build_request_control(
        "latencyPriors: {prefillTokensPerSecond: 8000, decodeMsPerToken: 24}",
        services=fast_prefill,
    )
    for services in (default, fast_prefill):
        e = Endpoint("127.0.0.2", 8000)
        measured_at(services, e, 24.0)
        assert e.latency.decode_tpot_ms == 24.0
    assert default.latency.prefill_tokens_per_s(e, 101.0) == pytest.approx(2000.0)
    e = Endpoint("127.0.0.3", 8000)
    measured_at(fast_prefill, e, 24.0)
    assert fast_prefill.latency.prefill_tokens_per_s(e, 101.0) == pytest.approx(8000.0)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("latencyPriors: {prefillTokensPerSecnd: 2000}", "prefillTokensPerSecnd"),
        ("latencyPriors: {decodeMsPerToken: 0}", "decodeMsPerToken"),
        ("latencyPriors: {prefillTokensPerSecond: -5}", "prefillTokensPerSecond"),
        ("latencyPriors: 5", "latencyPriors"),
    ],
)
def test_bad_priors_are_config_errors_naming_the_field(text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        build_request_control(text, services=Services())


def test_a_reload_keeps_what_the_fleet_taught_and_a_failed_one_changes_nothing() -> None:
    services = Services()
    build_request_control(SLOW_POOL, services=services)
    model = services.latency
    e, unmeasured = Endpoint("127.0.0.2", 8000), Endpoint("127.0.0.3", 8000)
    measured_at(services, e, 48.0)  # the pool is twice slower than even these priors
    assert model.speeds(unmeasured, 101.0)[1] == 2.0
    model.priors.prefill_ms_per_token = 0.55  # as true first tokens move it (observe_ttft)

    build_request_control(SLOW_POOL, services=services)  # the same file again
    assert model.priors.prefill_ms_per_token == 0.55
    assert model.speeds(unmeasured, 101.0)[1] == 2.0

    with pytest.raises(ConfigError):  # new priors in a file that does not build
        build_request_control(
            "latencyPriors: {decodeMsPerToken: 48}\nplugins: [{type: no-such-scorer}]",
            services=services,
        )
    assert model.priors.tpot_ms == 24.0 and model.priors.prefill_ms_per_token == 0.55

    # new priors: the fleet's measured 48 ms a token stays 48 ms, now factor 1 against them
    build_request_control("latencyPriors: {decodeMsPerToken: 48}", services=services)
    assert model.priors == LatencyPriors(tpot_ms=48.0)
    assert model.speeds(unmeasured, 101.0) == (0.0, 1.0)
    assert model.decode_time_s(unmeasured, 100, 101.0) == pytest.approx(4.8)
    # and a file without the section goes back to the defaults
    build_request_control(None, services=services)
    assert model.priors == LatencyPriors()
    assert model.decode_time_s(unmeasured, 100, 101.0) == pytest.approx(4.8)


def test_the_gauges_say_which_pods_run_on_priors_and_what_the_others_measured() -> None:
    services = Services()
    control = build_request_control("latencyPriors: {decodeMsPerToken: 30}", services=services)
    ds = Datastore()
    measured, unmeasured = (ds.upsert_endpoint("t", Endpoint(f"127.0.0.{i}", 8000)) for i in (2, 3))
    director = Director(ds, control.scheduler, hooks=control.hooks)
    metrics = EppMetrics()
    metrics.attach_speed_estimates(director.speed_estimates)

    def gauge(name: str, ep: Endpoint, source: str) -> float | None:
        labels = {"endpoint": ep.key, "source": source}
        clock.set_clock(lambda: 101.5)  # the gauges are read just after measured_at's window
        try:
            return metrics.registry.get_sample_value(name, labels)
        finally:
            clock.set_clock(None)

    assert gauge("epp_endpoint_decode_ms_per_token", measured, "fleet") == 30.0
    assert gauge("epp_endpoint_prefill_tokens_per_second", unmeasured, "fleet") == 4000.0
    measured_at(services, measured, 60.0)  # a pod twice slower than the priors say
    assert gauge("epp_endpoint_decode_ms_per_token", measured, "measured") == 60.0
    assert gauge("epp_endpoint_prefill_tokens_per_second", measured, "measured") == 2000.0
    assert gauge("epp_endpoint_decode_ms_per_token", measured, "fleet") is None
    # the fleet's reading is what an unmeasured pod is predicted at
    assert gauge("epp_endpoint_decode_ms_per_token", unmeasured, "fleet") == 60.0


def test_a_pool_far_from_the_priors_is_told_once_how_to_start_there(
    caplog: pytest.LogCaptureFixture,
) -> None:
    near, far = Services(), Services()
    for services in (near, far):
        build_request_control(None, services=services)
    with caplog.at_level(logging.INFO, logger="epp.scheduling.latency_model"):
        measured_at(near, Endpoint("127.0.0.2", 8000), 14.0)  # 1.2x the priors: fine
        assert not caplog.records
        measured_at(far, Endpoint("127.0.0.3", 8000), 36.0)  # 3x: the first picks were off
        measured_at(far, Endpoint("127.0.0.4", 8000), 36.0)  # the fleet is measured: no more
    (record,) = caplog.records
    assert "36.0 ms a token" in record.getMessage() and "latencyPriors" in record.getMessage()


def test_priors_alone_keep_the_built_in_scheduling() -> None:
    """A ModelPool's `spec.epp.config: {latencyPriors: ...}` with nothing else."""
    services = Services()
    control = build_request_control("latencyPriors: {decodeMsPerToken: 30}", services=services)
    default = build_request_control(None, services=Services())
    assert list(control.scheduler.profiles) == list(default.scheduler.profiles)
    assert services.latency.priors.tpot_ms == 30.0
