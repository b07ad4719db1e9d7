"""The clock seam: the EPP's request-control and data layer follow an injected clock (what
the virtual-time simulator relies on), and production's monotonic clock comes back."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest

from epp import clock
from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint
from epp.requestcontrol.admission import SaturationPolicy
from epp.requestcontrol.config import build_request_control
from epp.requestcontrol.director import Director
from epp.scheduling.request import InferenceRequest


@pytest.fixture
def fake_time() -> Iterator[list[float]]:
    t = [1000.0]
    clock.set_clock(lambda: t[0])
    try:
        yield t
    finally:
        clock.set_clock(None)


def test_director_and_staleness_follow_the_injected_clock(fake_time: list[float]) -> None:
    ds = Datastore()
    eps = [Endpoint(f"127.0.0.{i}", 8000) for i in (2, 3)]
    for e in eps:
        ds.upsert_endpoint("t", e)
    rc = build_request_control(None)
    director = Director(ds, rc.scheduler, hooks=rc.hooks, rng=random.Random(1))
    d = director.admit(InferenceRequest("r1", "m", prompt=b"x" * 400, prompt_tokens=100))
    assert d.started == 1000.0
    fake_time[0] = 1000.25
    director.first_byte(d)
    assert d.first_byte_at == 1000.25
    director.release(d)
    assert all(e.inflight.requests == 0 for e in eps)

    m = eps[0].metrics
    m.updated_at, m.waiting, m.kv_usage = 1000.0, 10, 0.95
    assert m.age() == pytest.approx(0.25)
    policy = SaturationPolicy(metrics_stale_after=0.2)
    eps[1].metrics.updated_at, eps[1].metrics.waiting, eps[1].metrics.kv_usage = 1000.2, 10, 0.9
    assert not policy.pool_saturated(eps)  # the first endpoint's metrics are stale
    fake_time[0] = 1000.1
    assert policy.pool_saturated(eps)


def test_default_clock_is_monotonic() -> None:
    clock.set_clock(None)
    assert abs(clock.now() - time.monotonic()) < 1.0
