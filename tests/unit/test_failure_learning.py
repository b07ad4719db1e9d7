"""The EPP learns of failing endpoints: from the gateway's answer (failure-learning hook),
from the scraper's refused connections, and the health filter stops picking them."""

from __future__ import annotations

import asyncio
import math
import random
import time

from epp import clock
from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint
from epp.datalayer.metrics_scraper import MetricsScraper
from epp.devstack.procs import free_port
from epp.requestcontrol.config import build_request_control
from epp.requestcontrol.director import Director
from epp.requestcontrol.hooks.failure_learning import FailureLearning
from epp.scheduling.plugins.filters import HealthFilter
from epp.scheduling.request import CycleState, InferenceRequest


def pool(n: int = 3) -> tuple[Director, list[Endpoint]]:
    ds = Datastore()
    eps = [Endpoint(f"127.0.0.{i + 1}", 8000) for i in range(n)]
    for e in eps:
        ds.upsert_endpoint("t", e)
    rc = build_request_control(None)  # the default config: 3 endpoints, failure learning
    return Director(ds, rc.scheduler, hooks=rc.hooks, rng=random.Random(3)), eps


def schedule(d: Director, i: int = 0):  # type: ignore[no-untyped-def]
    req = InferenceRequest(f"r{i}", "m", prompt=b"hello %d" % i, prompt_tokens=2)
    return d.admit(req)


def test_default_config_names_fallbacks_and_learns_failures() -> None:
    d, _ = pool()
    assert any(isinstance(h, FailureLearning) for h in d.hooks)
    dec = schedule(d)
    assert len(dec.result.primary) == 3  # target + 2 fallbacks for the gateway's retries


def test_hosts_before_the_served_one_are_marked_and_skipped() -> None:
    d, _ = pool()
    dec = schedule(d)
    first, second, third = dec.result.primary
    dec.attempts, dec.served = 2, second.key
    d.response_headers(dec, 200)
    d.release(dec)
    now = clock.now()
    assert first.health.down(now) and first.health.reason(now) == "unreachable"
    assert not second.health.down(now) and not third.health.down(now)
    assert first.health.connect_failures == 1
    # The next requests avoid it, fallbacks included.
    for i in range(1, 30):
        nxt = schedule(d, i)
        assert first not in nxt.result.primary
        d.release(nxt)
    # The hold ends by itself (no scraper in this test).
    first.health.unreachable_until = now - 1
    assert any(first in schedule(d, 100 + i).result.primary for i in range(10))


def test_hosts_skipped_without_an_attempt_are_not_blamed() -> None:
    d, _ = pool()
    dec = schedule(d)
    first, second, _third = dec.result.primary
    dec.attempts, dec.served = 1, second.key  # the gateway did not know `first` yet
    d.response_headers(dec, 200)
    assert not first.health.down(clock.now())
    dec.attempts = 0  # a gateway that does not report attempts: trust the order
    d.response_headers(dec, 200)
    assert first.health.down(clock.now())


def test_gateway_failure_marks_every_host_it_tried() -> None:
    d, _ = pool()
    dec = schedule(d)
    dec.attempts, dec.served = 2, ""  # the gateway's own 503 after two attempts
    d.response_headers(dec, 503)
    now = clock.now()
    tried = dec.result.primary
    assert [ep.health.down(now) for ep in tried] == [True, True, False]


def test_answers_from_unlisted_hosts_and_success_change_nothing() -> None:
    d, eps = pool()
    dec = schedule(d)
    dec.attempts, dec.served = 1, "10.9.9.9:1"
    d.response_headers(dec, 200)
    dec2 = schedule(d, 1)
    dec2.attempts, dec2.served = 1, dec2.target.key
    d.response_headers(dec2, 200)
    assert not any(ep.health.down(clock.now()) for ep in eps)


def test_burst_of_5xx_cools_an_endpoint_off() -> None:
    hook = FailureLearning(params={"errorBurst": 3, "coolOffSeconds": 60})
    d, eps = pool()
    target = eps[0]
    for i in range(5):
        dec = schedule(d, i)
        dec.served = target.key
        dec.result.primary = [target]
        hook.response_headers(dec, 500 if i != 1 else 200)  # a success resets the run
    now = clock.now()
    assert target.health.down(now) and target.health.reason(now) == "errors"
    assert target.health.error_bursts == 1


def test_health_filter_never_empties_the_pool() -> None:
    eps = [Endpoint(f"127.0.0.{i}", 8000) for i in (1, 2)]
    f = HealthFilter()
    req = InferenceRequest("r", "m")
    eps[0].health.unreachable_until = math.inf
    assert f.filter(CycleState(), req, eps) == [eps[1]]
    eps[1].health.cool_off_until = clock.now() + 60
    assert f.filter(CycleState(), req, eps) == eps


async def test_scraper_marks_a_refused_endpoint_at_once_and_clears_when_back() -> None:
    from aiohttp import web

    from tests.unit.test_metrics_scraper import vllm_metrics_page

    port = free_port()
    ds = Datastore()
    ep = ds.upsert_endpoint("t", Endpoint("127.0.0.1", port))
    scraper = MetricsScraper(ds, interval=0.02, timeout=0.5, max_backoff=0.1)
    await scraper.start()
    runner: web.AppRunner | None = None
    try:
        deadline = time.monotonic() + 3
        while not ep.health.down(clock.now()):
            assert time.monotonic() < deadline, "refused connection not noticed"
            await asyncio.sleep(0.01)
        assert ep.health.connect_failures == 1  # counted once per outage
        app = web.Application()
        page = vllm_metrics_page()

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(text=page)

        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        deadline = time.monotonic() + 3
        while ep.health.down(clock.now()):
            assert time.monotonic() < deadline, "endpoint not taken back"
            await asyncio.sleep(0.01)
    finally:
        await scraper.stop()
        if runner is not None:
            await runner.cleanup()
