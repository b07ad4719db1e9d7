"""Flow control: priority bands, fairness between businesses, ordering, capacity, maximum
wait, cancellation and late binding — driven by plain method calls and a fake clock."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import yaml

from epp import clock as epp_clock
from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint, InFlight
from epp.requestcontrol.config import build_request_control
from epp.requestcontrol.director import Decision, Director, Ticket
from epp.requestcontrol.errors import RequestError
from epp.requestcontrol.flowcontrol import AsyncFlowWaiter, FlowController, TicketState
from epp.scheduling.config import DEFAULT_CONFIG, ConfigError
from epp.scheduling.request import InferenceRequest


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(autouse=True)
def _restore_clock() -> Iterator[None]:
    yield
    epp_clock.set_clock(None)


class Recorder:
    """A FlowObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, str, str]] = []

    def dispatched(self, priority: int, business: str, wait_s: float, queued: bool) -> None:
        self.events.append(("dispatched", priority, business, "queued" if queued else "now"))

    def rejected(self, priority: int, business: str, reason: str, wait_s: float) -> None:
        self.events.append(("rejected", priority, business, reason))

    def cancelled(self, priority: int, business: str, wait_s: float) -> None:
        self.events.append(("cancelled", priority, business, "client"))


DETECTOR = {"maxConcurrency": 1, "queueDepthThreshold": 0, "kvCacheUtilThreshold": 0}


def config_text(flow: dict[str, Any] | None = None, plugins: Sequence[Any] = (), **top: Any) -> str:
    cfg = yaml.safe_load(DEFAULT_CONFIG)
    for p in cfg["plugins"]:  # tenants share the unassigned pods
        if p["type"] == "business-filter":
            p["parameters"] = {"unassignedPolicy": "overflow"}
    cfg["plugins"] += list(plugins)
    cfg["featureGates"] = ["flowControl"]
    # Queue mechanics are tested with round robin: the default work fairness never holds a
    # tenant that is alone or within its share (tested on its own below).
    flow = {"defaultPriorityBand": {}, **(flow or {})}
    bands = [flow["defaultPriorityBand"], *flow.get("priorityBands", [])]
    if flow.get("defaultNegativePriorityBand") is not None:
        bands.append(flow["defaultNegativePriorityBand"])
    for band in bands:
        band.setdefault("fairnessPolicyRef", "round-robin-fairness-policy")
    cfg["flowControl"] = {"saturationDetector": DETECTOR, **flow}
    cfg.update(top)
    return yaml.safe_dump(cfg)


def make(
    n: int = 2,
    flow: dict[str, Any] | None = None,
    plugins: Sequence[Any] = (),
    businesses: list[str] | None = None,
) -> tuple[Director, list[Endpoint], Clock, Recorder]:
    clock = Clock()
    epp_clock.set_clock(clock)
    ds = Datastore()
    eps = []
    for i in range(n):
        e = Endpoint(f"127.0.0.{i + 1}", 8000, model="m")
        if businesses:
            e.business = businesses[i]
        eps.append(ds.upsert_endpoint("test", e))
    rc = build_request_control(config_text(flow, plugins))
    rec = Recorder()
    d = Director(
        ds,
        rc.scheduler,
        hooks=rc.hooks,
        flow_control=rc.flow_control,
        flow_observer=rec,
        rng=random.Random(1),
    )
    return d, eps, clock, rec


def req(
    rid: str,
    priority: int = 0,
    business: str | None = None,
    slo_ttft_ms: float | None = None,
    fairness_id: str | None = None,
) -> InferenceRequest:
    r = InferenceRequest(
        request_id=rid, model="m", prompt=f"{rid} hello".encode(), prompt_tokens=10
    )
    r.priority = priority
    r.business = business
    r.slo_ttft_ms = slo_ttft_ms
    if fairness_id:
        r.headers = {"x-gateway-inference-fairness-id": fairness_id}
    return r


def fc(d: Director) -> FlowController:
    assert d.flow is not None
    return d.flow


def fill(d: Director, eps: list[Endpoint]) -> list[Decision]:
    """One request per endpoint: with maxConcurrency 1 the pool is then saturated."""
    out = []
    for i in range(len(eps)):
        got = d.submit(req(f"fill{i}"))
        assert isinstance(got, Decision)
        out.append(got)
    return out


def tracked(t: Decision | Ticket, log: list[Ticket]) -> Ticket:
    assert isinstance(t, Ticket), t
    t.on_done = log.append
    return t


def assert_idle(d: Director, eps: list[Endpoint]) -> None:
    for e in eps:
        assert e.inflight == InFlight(), (e.key, e.inflight)
    f = fc(d)
    assert f.queued == 0 and f.queued_bytes == 0
    assert all(b.count == 0 and b.bytes == 0 and not b.flows for b in f.bands.values())
    assert all(v == 0 for v in f.sizes.values())
    assert f.next_expiry() is None


# ---- fast path and late binding ------------------------------------------------------------
def test_not_saturated_goes_at_once_without_a_ticket() -> None:
    d, _eps, _, rec = make()
    got = d.submit(req("a"))
    assert isinstance(got, Decision)
    assert fc(d).queued == 0
    assert rec.events == [("dispatched", 0, "", "now")]


def test_saturated_request_waits_then_goes_to_the_endpoint_that_freed() -> None:
    d, eps, clock, _rec = make(3)
    first = fill(d, eps)
    done: list[Ticket] = []
    t = tracked(d.submit(req("late")), done)
    assert t.queued and fc(d).queued == 1
    # nothing frees: a pump dispatches nothing
    assert fc(d).pump() == 0 and not done
    clock.t += 0.5
    freed = first[1]
    d.release(freed)  # the lifecycle hook pumps the queue
    assert done == [t] and t.state is TicketState.DISPATCHED
    assert t.decision is not None
    # late binding: scheduled at dispatch time, on the one endpoint with room
    assert t.decision.target is freed.target
    assert t.decision.queue_wait_s == pytest.approx(0.5)
    assert t.decision.target.inflight.requests == 1
    for dec in (first[0], first[2], t.decision):
        d.release(dec)
    assert_idle(d, eps)


def test_first_token_frees_capacity_when_the_detector_counts_pending_prefills() -> None:
    d, eps, _, _ = make(
        1, flow={"saturationDetector": {"queueDepthThreshold": 1, "kvCacheUtilThreshold": 0}}
    )
    first = d.submit(req("a"))
    assert isinstance(first, Decision)
    done: list[Ticket] = []
    t = tracked(d.submit(req("b")), done)
    d.first_byte(first)  # prefill done: no longer pending on the pod
    assert done == [t]
    d.release(first)
    assert t.decision is not None
    d.release(t.decision)
    assert_idle(d, eps)


def test_fresh_scraped_queue_saturates_and_its_drop_dispatches_on_the_next_pump() -> None:
    d, eps, clock, _ = make(1, flow={"saturationDetector": {"queueDepthThreshold": 3}})
    m = eps[0].metrics
    m.waiting, m.updated_at = 5, clock.t
    done: list[Ticket] = []
    t = tracked(d.submit(req("a")), done)
    clock.t += 0.1
    m.waiting, m.updated_at = 0, clock.t  # the next scrape: the queue drained
    assert fc(d).pump() == 1 and done == [t]
    # stale metrics are not taken as saturation
    m.waiting, m.updated_at = 50, clock.t - 10
    assert t.decision is not None
    d.release(t.decision)
    assert isinstance(d.submit(req("b")), Decision)


def test_a_new_request_does_not_overtake_queued_ones_of_its_priority() -> None:
    d, eps, _, _ = make(1)
    (first,) = fill(d, eps)
    done: list[Ticket] = []
    t1 = tracked(d.submit(req("q1")), done)
    d.release(first)
    assert done == [t1]
    # t1 holds the endpoint; another request now waits behind nobody but must queue
    t2 = tracked(d.submit(req("q2")), done)
    assert t2.state is TicketState.QUEUED
    assert t1.decision is not None
    d.release(t1.decision)
    assert done == [t1, t2]
    assert t2.decision is not None
    d.release(t2.decision)
    assert_idle(d, eps)


def test_business_whose_pods_are_full_waits_even_if_other_pods_are_free() -> None:
    d, eps, _, _ = make(2, businesses=["a", "b"])
    got = d.submit(req("a1", business="a"))
    assert isinstance(got, Decision) and got.target is eps[0]
    done: list[Ticket] = []
    t = tracked(d.submit(req("a2", business="a")), done)
    assert t.state is TicketState.QUEUED  # not 503, not sent to business b's pod
    other = d.submit(req("b1", business="b"))
    assert isinstance(other, Decision) and other.target is eps[1]
    d.release(got)
    assert done == [t] and t.decision is not None and t.decision.target is eps[0]
    d.release(t.decision)
    d.release(other)
    assert_idle(d, eps)


# ---- priority, fairness, ordering -------------------------------------------------------------
def drain_order(d: Director, held: list[Decision], done: list[Ticket]) -> list[str]:
    """Release one request at a time and return the ids in the order they dispatched."""
    order: list[str] = []
    while held:
        d.release(held.pop(0))
        while done:
            t = done.pop(0)
            assert t.decision is not None
            order.append(t.admitted.request.request_id)
            held.append(t.decision)
    return order


def test_bands_are_served_strictly_by_priority() -> None:
    d, eps, _, _ = make(1)
    held = fill(d, eps)
    done: list[Ticket] = []
    for rid, prio in [("low1", -1), ("std1", 0), ("high1", 5), ("low2", -1), ("high2", 5)]:
        tracked(d.submit(req(rid, priority=prio)), done)
    assert drain_order(d, held, done) == ["high1", "high2", "std1", "low1", "low2"]
    assert_idle(d, eps)


def test_a_higher_priority_arrival_may_go_ahead_of_lower_queued_ones() -> None:
    d, eps, _, _ = make(2)
    held = fill(d, eps)
    done: list[Ticket] = []
    tracked(d.submit(req("low", priority=-1)), done)
    d.release(held.pop())  # one endpoint free, but the low one takes it
    assert len(done) == 1
    # Nothing of priority >= 3 waits and nothing has room now: it queues, then goes first.
    tracked(d.submit(req("urgent", priority=3)), done)
    tracked(d.submit(req("low2", priority=-1)), done)
    held.extend(t.decision for t in done if t.decision is not None)
    done.clear()
    assert drain_order(d, held, done) == ["urgent", "low2"]


def test_round_robin_between_businesses_inside_a_band() -> None:
    d, eps, _, _ = make(1)
    held = fill(d, eps)
    done: list[Ticket] = []
    for i in range(12):  # the flood arrives first
        tracked(d.submit(req(f"flood{i}", business="flood")), done)
    for i in range(4):
        tracked(d.submit(req(f"steady{i}", business="steady")), done)
    order = drain_order(d, held, done)
    first8 = Counter(rid.rstrip("0123456789") for rid in order[:8])
    assert first8 == {"flood": 4, "steady": 4}
    assert order[:4] == ["flood0", "steady0", "flood1", "steady1"]
    assert_idle(d, eps)


def test_weighted_fairness_dispatches_in_proportion_to_the_weights() -> None:
    plugin = {
        "type": "weighted-fairness-policy",
        "name": "shares",
        "parameters": {"weights": {"gold": 3, "bronze": 1}},
    }
    d, eps, _, _ = make(
        1, flow={"defaultPriorityBand": {"fairnessPolicyRef": "shares"}}, plugins=[plugin]
    )
    held = fill(d, eps)
    done: list[Ticket] = []
    for i in range(40):
        tracked(d.submit(req(f"bronze{i}", business="bronze")), done)
        tracked(d.submit(req(f"gold{i}", business="gold")), done)
    order = drain_order(d, held, done)
    first40 = Counter(rid.rstrip("0123456789") for rid in order[:40])
    assert first40 == {"gold": 30, "bronze": 10}


def test_fairness_id_header_wins_over_business() -> None:
    d, eps, _, _ = make(1)
    held = fill(d, eps)
    done: list[Ticket] = []
    for i in range(4):
        tracked(d.submit(req(f"u1-{i}", business="b", fairness_id="user1")), done)
    for i in range(2):
        tracked(d.submit(req(f"u2-{i}", business="b", fairness_id="user2")), done)
    order = drain_order(d, held, done)
    assert order[:4] == ["u1-0", "u2-0", "u1-1", "u2-1"]


def test_global_strict_fairness_is_one_queue_in_arrival_order() -> None:
    d, eps, _, _ = make(
        1, flow={"defaultPriorityBand": {"fairnessPolicyRef": "global-strict-fairness-policy"}}
    )
    held = fill(d, eps)
    done: list[Ticket] = []
    ids = ["a0", "a1", "a2", "b0", "a3"]
    for rid in ids:
        tracked(d.submit(req(rid, business=rid[0])), done)
    assert drain_order(d, held, done) == ids


def test_slo_deadline_ordering_serves_the_tightest_deadline_first() -> None:
    d, eps, clock, _ = make(
        1, flow={"defaultPriorityBand": {"orderingPolicyRef": "slo-deadline-ordering-policy"}}
    )
    held = fill(d, eps)
    done: list[Ticket] = []
    tracked(d.submit(req("none")), done)
    clock.t += 0.1
    tracked(d.submit(req("loose", slo_ttft_ms=5000)), done)
    clock.t += 0.1
    tracked(d.submit(req("tight", slo_ttft_ms=200)), done)  # deadline +0.4 s vs +5.1 s
    assert drain_order(d, held, done) == ["tight", "loose", "none"]


# ---- bounds ---------------------------------------------------------------------------------------
def test_band_capacity_rejects_with_429_and_retry_after() -> None:
    d, eps, _, rec = make(1, flow={"priorityBands": [{"priority": 0, "maxRequests": 2}]})
    fill(d, eps)
    done: list[Ticket] = []
    tracked(d.submit(req("q1")), done)
    tracked(d.submit(req("q2")), done)
    with pytest.raises(RequestError) as ei:
        d.submit(req("q3"))
    e = ei.value
    assert e.status == 429 and e.headers is not None and int(e.headers["retry-after"]) >= 1
    assert b"rate_limit_error" in e.body()
    assert ("rejected", 0, "", "band_full") in rec.events
    # another band has its own capacity
    assert isinstance(d.submit(req("other", priority=1)), Ticket)


def test_global_capacity_and_bytes() -> None:
    d, eps, _, _ = make(1, flow={"maxRequests": 2})
    fill(d, eps)
    d.submit(req("a", priority=1))
    d.submit(req("b", priority=0))
    with pytest.raises(RequestError) as ei:
        d.submit(req("c", priority=2))
    assert ei.value.status == 429
    d2, eps2, _, _ = make(1, flow={"defaultPriorityBand": {"maxBytes": 30}})
    fill(d2, eps2)
    d2.submit(req("x" * 10))  # 16 bytes of prompt
    with pytest.raises(RequestError):
        d2.submit(req("y" * 10))


def test_maximum_wait_then_429_and_the_queue_is_empty() -> None:
    d, eps, clock, rec = make(1, flow={"defaultRequestTTL": "2s"})
    held = fill(d, eps)
    done: list[Ticket] = []
    t1 = tracked(d.submit(req("a")), done)
    clock.t += 1.0
    t2 = tracked(d.submit(req("b")), done)
    assert fc(d).next_expiry() == pytest.approx(clock.t + 1.0)
    clock.t += 1.5
    fc(d).pump()
    assert done == [t1] and t1.state is TicketState.REJECTED
    assert t1.error is not None and t1.error.status == 429
    assert t1.error.headers and "retry-after" in t1.error.headers
    assert t2.queued
    clock.t += 1.0
    fc(d).pump()
    assert done == [t1, t2]
    assert [e[3] for e in rec.events if e[0] == "rejected"] == ["ttl", "ttl"]
    d.release(held[0])
    assert_idle(d, eps)


def test_per_band_ttl_overrides_the_default() -> None:
    d, eps, clock, _ = make(
        1,
        flow={
            "defaultRequestTTL": "10s",
            "priorityBands": [{"priority": -1, "requestTTL": "100ms"}],
        },
    )
    fill(d, eps)
    done: list[Ticket] = []
    low = tracked(d.submit(req("low", priority=-1)), done)
    std = tracked(d.submit(req("std")), done)
    clock.t += 0.2
    fc(d).pump()
    assert done == [low] and std.queued


# ---- cancellation and leaks ----------------------------------------------------------------------
def test_cancel_while_queued_leaves_the_queue_and_is_never_dispatched() -> None:
    d, eps, _, rec = make(1)
    held = fill(d, eps)
    done: list[Ticket] = []
    gone = tracked(d.submit(req("gone", business="x")), done)
    stays = tracked(d.submit(req("stays", business="x")), done)
    fc(d).cancel(gone)
    fc(d).cancel(gone)  # idempotent
    assert gone.state is TicketState.CANCELLED and fc(d).queued == 1
    assert fc(d).sizes[(0, "x")] == 1
    assert ("cancelled", 0, "x", "client") in rec.events
    d.release(held[0])
    assert done == [stays]
    assert stays.decision is not None
    d.release(stays.decision)
    assert_idle(d, eps)


def test_cancel_after_dispatch_releases_the_endpoint() -> None:
    d, eps, _, _ = make(1)
    held = fill(d, eps)
    done: list[Ticket] = []
    t = tracked(d.submit(req("racy")), done)
    d.release(held[0])
    assert t.state is TicketState.DISPATCHED and eps[0].inflight.requests == 1
    fc(d).cancel(t)  # the client left between dispatch and its task resuming
    assert_idle(d, eps)


def test_unschedulable_at_dispatch_time_is_rejected_not_stranded() -> None:
    d, eps, _, _ = make(1)
    held = fill(d, eps)
    done: list[Ticket] = []
    t = tracked(d.submit(req("orphan")), done)
    d.datastore.remove_endpoint(eps[0].key)
    d.release(held[0])
    assert done == [t] and t.error is not None and t.error.status in (404, 503)
    assert fc(d).queued == 0


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_never_leaks(seed: int) -> None:
    rng = random.Random(seed)
    d, eps, clock, _ = make(
        3,
        flow={
            "defaultRequestTTL": "1s",
            "defaultPriorityBand": {"maxRequests": 15},
            "priorityBands": [{"priority": 1, "orderingPolicyRef": "slo-deadline-ordering-policy"}],
        },
    )
    live: list[Decision] = []
    queued: list[Ticket] = []
    done: list[Ticket] = []
    for i in range(600):
        clock.t += rng.expovariate(40)
        op = rng.random()
        if op < 0.5:
            r = req(
                f"r{i}",
                priority=rng.choice([-1, 0, 1]),
                business=rng.choice(["a", "b", "c", None]),
                slo_ttft_ms=rng.choice([None, 100.0, 900.0]),
            )
            try:
                got = d.submit(r)
            except RequestError as e:
                assert e.status == 429
                continue
            if isinstance(got, Decision):
                live.append(got)
            else:
                got.on_done = done.append
                queued.append(got)
        elif op < 0.8 and live:
            dec = live.pop(rng.randrange(len(live)))
            if rng.random() < 0.5:
                d.first_byte(dec)
            d.release(dec)
        elif op < 0.9 and queued:
            t = queued.pop(rng.randrange(len(queued)))
            fc(d).cancel(t)
            if t.decision is not None:
                live_ids = {id(x) for x in live}
                assert id(t.decision) not in live_ids
        else:
            fc(d).pump()
        for t in done:
            if t.state is TicketState.DISPATCHED and t.decision is not None:
                live.append(t.decision)
            if t in queued:
                queued.remove(t)
        done.clear()
        for ep_ in eps:
            assert 0 <= ep_.inflight.requests <= 1
    for t in queued:
        fc(d).cancel(t)
    for dec in live:
        d.release(dec)
    clock.t += 5
    fc(d).pump()
    assert_idle(d, eps)


# ---- asyncio layer -------------------------------------------------------------------------------
async def test_async_wait_returns_the_decision_and_cancel_leaves_the_queue() -> None:
    d, eps, _, _ = make(1)
    held = fill(d, eps)
    waiter = AsyncFlowWaiter(tick_s=0.005)
    t1 = d.submit(req("w1"))
    t2 = d.submit(req("w2"))
    assert isinstance(t1, Ticket) and isinstance(t2, Ticket)
    task1 = asyncio.create_task(waiter.wait(t1))
    task2 = asyncio.create_task(waiter.wait(t2))
    await asyncio.sleep(0)  # both tasks are now waiting
    task2.cancel()  # the client of w2 went away
    with pytest.raises(asyncio.CancelledError):
        await task2
    assert t2.state is TicketState.CANCELLED and fc(d).queued == 1
    d.release(held[0])
    dec = await asyncio.wait_for(task1, 1)
    assert dec.request.request_id == "w1"
    d.release(dec)
    waiter.close()
    assert_idle(d, eps)


async def test_async_tick_moves_the_queue_when_scraped_load_drops_and_rejects_on_ttl() -> None:
    d, eps, clock, _ = make(
        1, flow={"saturationDetector": {"kvCacheUtilThreshold": 0.9}, "defaultRequestTTL": "1s"}
    )
    m = eps[0].metrics
    m.kv_usage, m.updated_at = 0.95, clock.t
    waiter = AsyncFlowWaiter(tick_s=0.002)
    t = d.submit(req("kv"))
    assert isinstance(t, Ticket)
    task = asyncio.create_task(waiter.wait(t))
    await asyncio.sleep(0.01)
    assert not task.done()
    m.kv_usage = 0.5
    dec = await asyncio.wait_for(task, 1)
    d.release(dec)
    m.kv_usage = 0.95
    t2 = d.submit(req("kv2"))
    assert isinstance(t2, Ticket)
    task2 = asyncio.create_task(waiter.wait(t2))
    await asyncio.sleep(0.01)
    clock.t += 2
    with pytest.raises(RequestError) as ei:
        await asyncio.wait_for(task2, 1)
    assert ei.value.status == 429
    waiter.close()


# ---- reload ------------------------------------------------------------------------------------
def test_reconfigure_moves_queued_requests_to_the_new_queue_in_order() -> None:
    d, eps, _, _ = make(1)
    held = fill(d, eps)
    done: list[Ticket] = []
    ts = [tracked(d.submit(req(f"q{i}")), done) for i in range(3)]
    old = fc(d)
    rc = build_request_control(config_text({"defaultRequestTTL": "5s"}))
    d.reconfigure(rc.scheduler, rc.hooks, rc.flow_control)
    assert fc(d) is not old and fc(d).queued == 3 and old.queued == 0
    assert old.successor is fc(d) and all(t.controller is fc(d) for t in ts)
    # the decision made before the reload is released through its own hooks
    assert drain_order(d, held, done) == ["q0", "q1", "q2"]
    assert_idle(d, eps)


def test_turning_flow_control_off_dispatches_what_waited() -> None:
    d, eps, _, _ = make(1)
    held = fill(d, eps)
    done: list[Ticket] = []
    t = tracked(d.submit(req("q")), done)
    rc = build_request_control(
        DEFAULT_CONFIG.replace("kind:", "featureGates: [flowControl=false]\nkind:")
    )
    d.reconfigure(rc.scheduler, rc.hooks, rc.flow_control)
    assert d.flow is None and done == [t] and t.decision is not None
    d.release(t.decision)
    d.release(held[0])
    for e in eps:
        assert e.inflight == InFlight()


# ---- config --------------------------------------------------------------------------------------
def flow_settings(text: str) -> Any:
    return build_request_control(text).flow_control


def test_on_unless_the_feature_gate_turns_it_off() -> None:
    cfg = yaml.safe_load(config_text())
    cfg["featureGates"] = []
    assert flow_settings(yaml.safe_dump(cfg)) is not None
    cfg["featureGates"] = ["flowControl=false"]
    assert flow_settings(yaml.safe_dump(cfg)) is None
    cfg["featureGates"] = ["flowControl=true"]
    assert flow_settings(yaml.safe_dump(cfg)) is not None
    default = flow_settings(DEFAULT_CONFIG)
    # the built-in default: work fairness and the predicted-wait detector
    assert type(default.band(0).fairness).__name__ == "WorkFairness"
    assert default.detector.max_ttft_ms == 300.0 and default.detector.queue_depth == 0


def test_config_values_and_ecosystem_shapes() -> None:
    text = config_text(
        {
            "maxRequests": "1k",
            "maxBytes": "1Mi",
            "defaultRequestTTL": "1m30s",
            "defaultNegativePriorityBand": {"maxRequests": 3},
            "priorityBands": [{"priority": 2, "maxBytes": "2k", "requestTTL": "250ms"}],
            "saturationDetector": {"pluginRef": "det"},
        },
        plugins=[
            {
                "type": "utilization-detector",
                "name": "det",
                "parameters": {"queueDepthThreshold": 7, "metricsStalenessThreshold": "150ms"},
            }
        ],
    )
    s = flow_settings(text)
    assert (s.max_requests, s.max_bytes, s.request_ttl_s) == (1000, 1 << 20, 90.0)
    assert s.detector.queue_depth == 7 and s.detector.stale_after == pytest.approx(0.15)
    assert s.detector.kv_util == 0.8  # utilization-detector default
    assert s.band(-5).max_requests == 3 and s.band(0).max_requests == 5000
    b2 = s.band(2)
    assert (b2.max_bytes, b2.ttl_s) == (2000, 0.25)
    assert type(b2.fairness).__name__ == "RoundRobinFairness"
    # GIE's older top-level saturationDetector section
    cfg = yaml.safe_load(config_text())
    del cfg["flowControl"]["saturationDetector"]
    cfg["saturationDetector"] = {"queueDepthThreshold": 9, "kvCacheUtilThreshold": 0.5}
    s = flow_settings(yaml.safe_dump(cfg))
    assert (s.detector.queue_depth, s.detector.kv_util) == (9, 0.5)
    # concurrency-detector defaults
    s = flow_settings(config_text({"saturationDetector": {"pluginRef": "concurrency-detector"}}))
    assert s.detector.max_concurrency == 100 and s.detector.queue_depth == 0


@pytest.mark.parametrize(
    ("flow", "message"),
    [
        ({"maxRequest": 3}, "unknown key 'maxRequest'"),
        ({"enableEviction": True}, "not supported"),
        ({"defaultRequestTTL": "soon"}, "not a duration"),
        ({"maxBytes": "lots"}, "not a quantity"),
        ({"defaultPriorityBand": {"fairnessPolicyRef": "nope"}}, "unknown fairness policy 'nope'"),
        ({"defaultPriorityBand": {"orderingPolicyRef": "lifo"}}, "unknown ordering policy"),
        ({"priorityBands": [{"maxRequests": 3}]}, "priority must be an integer"),
        ({"priorityBands": [{"priority": 1}, {"priority": 1}]}, "listed twice"),
        ({"priorityBands": [{"priority": 1, "ttl": "1s"}]}, "unknown key 'ttl'"),
        ({"saturationDetector": {"pluginRef": "missing"}}, "no plugin named 'missing'"),
        ({"saturationDetector": {"queueDepth": 3}}, "unknown parameter"),
        ({"saturationDetector": {"kvCacheUtilThreshold": 2}}, "fraction"),
    ],
)
def test_bad_flow_control_config_is_a_clear_error(flow: dict[str, Any], message: str) -> None:
    cfg = yaml.safe_load(config_text())
    cfg["flowControl"].update(flow)
    with pytest.raises(ConfigError, match=message):
        build_request_control(yaml.safe_dump(cfg))


def test_a_config_with_only_flow_control_keeps_the_built_in_scheduling() -> None:
    text = "featureGates: [flowControl]\nflowControl: {defaultRequestTTL: 5s}\n"
    rc = build_request_control(text)
    default = build_request_control(None)
    assert set(rc.scheduler.profiles) == set(default.scheduler.profiles)
    assert rc.flow_control is not None and rc.flow_control.request_ttl_s == 5
    assert [type(h).type_name for h in rc.hooks] == [type(h).type_name for h in default.hooks]


def test_a_pass_over_many_blocked_flows_does_not_reschedule_each_one() -> None:
    d, _eps, _, _ = make(2, businesses=["a", "b"])
    held = [d.submit(req("a0", business="a"))]
    calls = Counter[str]()
    real = d.candidates

    def counting(admitted: Any) -> Any:
        calls[admitted.request.request_id] += 1
        return real(admitted)

    d.candidates = counting  # type: ignore[method-assign]
    for i in range(300):
        d.submit(req(f"u{i}", business="a", fairness_id=f"user{i}"))
    calls.clear()
    # pod b has room but nobody queued may use it: one look per (model, business), not 300
    assert fc(d).pump() == 0
    assert sum(calls.values()) == 1
    held.append(d.submit(req("b0", business="b")))
    calls.clear()
    assert fc(d).pump() == 0  # nothing has room anywhere: not even one look
    assert sum(calls.values()) == 0
    assert fc(d).queued == 300
    for dec in held:
        assert isinstance(dec, Decision)
        d.release(dec)
    assert fc(d).queued == 299


# ---- work fairness -----------------------------------------------------------------------
WORK = {"defaultPriorityBand": {"fairnessPolicyRef": "work-fairness-policy"}}


def long_req(rid: str, tenant: str, tokens: int = 3000) -> InferenceRequest:
    prompt = ("tok " * tokens).encode()  # ~4 bytes a token, as the EPP estimates
    r = InferenceRequest(request_id=rid, model="m", prompt=prompt, prompt_tokens=tokens)
    r.headers = {"x-gateway-inference-fairness-id": tenant}
    return r


def test_work_fairness_never_holds_a_tenant_alone_in_the_band() -> None:
    d, _eps, _, _ = make(1, flow=WORK)
    # maxConcurrency 1 and one pod: the pool is saturated after the first, yet a lone
    # tenant is not held (holding it would only add delay)
    got = [d.submit(long_req(f"b{i}", "b")) for i in range(3)]
    assert all(isinstance(g, Decision) for g in got)
    assert fc(d).queued == 0
    for g in got:
        assert isinstance(g, Decision)
        d.release(g)


def test_work_fairness_holds_the_flooding_tenant_not_the_light_one() -> None:
    d, eps, clock, _ = make(1, flow=WORK)
    first = d.submit(long_req("a0", "a", tokens=20))  # the light tenant is active
    assert isinstance(first, Decision)
    d.release(first)
    heavy = [d.submit(long_req(f"b{i}", "b")) for i in range(4)]
    # b's first request finds a pod with room; after it, b is over its share of the work
    # and waits while the pod is full
    assert isinstance(heavy[0], Decision)
    assert all(isinstance(h, Ticket) for h in heavy[1:])
    clock.t += 0.5
    light = d.submit(long_req("a1", "a", tokens=20))
    assert isinstance(light, Decision)  # within its share: straight to the pod
    assert fc(d).queued == 3
    # releases dispatch b's queue in order; nothing leaks
    done: list[Ticket] = []
    for h in heavy[1:]:
        assert isinstance(h, Ticket)
        h.on_done = done.append
    d.release(light)
    assert isinstance(heavy[0], Decision)
    order = drain_order(d, [heavy[0]], done)
    assert order == ["b1", "b2", "b3"]
    assert_idle(d, eps)


def test_work_estimate_counts_the_uncached_prompt() -> None:
    d, _eps, _, _ = make(2, flow=WORK)
    fresh = d.admission(long_req("x", "a", tokens=2000))
    cost_fresh = d.work_estimate(fresh)
    assert cost_fresh > 2000
    dec = d.schedule(fresh)  # the prompt is now in the prefix index
    again = d.admission(long_req("x", "a", tokens=2000))
    assert d.work_estimate(again) < cost_fresh / 4
    d.release(dec)


ROOMY = {"maxConcurrency": 100, "queueDepthThreshold": 0, "kvCacheUtilThreshold": 0}


def fresh_req(rid: str, tenant: str, tokens: int) -> InferenceRequest:
    prompt = (f"{rid} " + "tok " * tokens).encode()  # unique from the first block on
    r = InferenceRequest(request_id=rid, model="m", prompt=prompt, prompt_tokens=tokens)
    r.headers = {"x-gateway-inference-fairness-id": tenant}
    return r


def flood(
    share: float | None, light: bool, n: int = 6
) -> tuple[list[Decision | Ticket], Director, Clock]:
    """Tenant b sends `n` requests of ~20k fresh tokens at once while the pods always have
    room; tenant a is active when `light`. With the priors two pods prefill 2 x 4000
    tokens/s: b's weighted share is 4000/s, its credit 10 s of that (two of its requests),
    and b counts as flooding once what it sent (decaying over 10 s) passes 1.5x its share
    (its third request)."""
    params = {} if share is None else {"shareOfCapacity": share}
    flow = {
        "saturationDetector": ROOMY,
        "defaultPriorityBand": {"fairnessPolicyRef": "wf"},
    }
    plugins = [{"name": "wf", "type": "work-fairness-policy", "parameters": params}]
    d, _eps, clock, _ = make(2, flow=flow, plugins=plugins)
    if light:
        a = d.submit(fresh_req("a0", "a", 50))
        assert isinstance(a, Decision)
    out = []
    for i in range(n):
        out.append(d.submit(fresh_req(f"b{i}", "b", 20_000)))
        clock.t += 0.01
    return out, d, clock


def test_a_flood_waits_at_its_share_of_prefill_capacity_though_pods_have_room() -> None:
    got, d, clock = flood(None, light=True)
    # the first goes within b's share of the work, the second before b counts as flooding;
    # then two more on its credit; the rest wait in the EPP although every pod has room, so
    # the light tenant's next prompt finds no more of the flood ahead of it on the pods
    assert [isinstance(g, Decision) for g in got] == [True, True, True, True, False, False]
    light = d.submit(fresh_req("a1", "a", 50))
    assert isinstance(light, Decision)
    # the credit refills at b's share: the queue moves again without any capacity event,
    # one request per 5 s of share
    assert fc(d).pump() == 0
    clock.t += 5.0
    assert fc(d).pump() == 1
    assert isinstance(got[4], Ticket) and got[4].state is TicketState.DISPATCHED
    assert isinstance(got[5], Ticket) and got[5].queued


def test_a_tenant_sending_about_its_share_is_never_held() -> None:
    flow = {"saturationDetector": ROOMY}
    d, _eps, clock, _ = make(2, flow={**flow, **WORK})
    # 1.4x its share for 28 s: beyond what 10 s of credit covers, but not a flood
    for i in range(40):
        a = d.submit(fresh_req(f"a{i}", "a", 50))
        b = d.submit(fresh_req(f"b{i}", "b", 4_000))
        assert isinstance(a, Decision) and isinstance(b, Decision), i
        clock.t += 0.7


def test_a_tenant_that_left_stops_holding_the_flood_back() -> None:
    got, d, clock = flood(None, light=True)
    assert isinstance(got[5], Ticket) and got[5].queued
    clock.t += 10.1  # tenant a sent nothing for 10 s: b is alone and goes where there is room
    assert fc(d).pump() == 2
    more = [d.submit(fresh_req(f"c{i}", "b", 20_000)) for i in range(3)]
    assert all(isinstance(g, Decision) for g in more)


def test_the_capacity_share_never_holds_a_tenant_alone_and_can_be_turned_off() -> None:
    alone, _, _ = flood(None, light=False)
    assert all(isinstance(g, Decision) for g in alone)
    off, _, _ = flood(0.0, light=True)
    assert all(isinstance(g, Decision) for g in off)
    wider, _, _ = flood(3.0, light=True)  # 3x its share: never flooding with these six
    assert all(isinstance(g, Decision) for g in wider)


def test_requests_say_whether_their_tenant_is_over_its_share() -> None:
    """The delay-cost scorer reads `over_share`: a tenant over its share keeps its prompts
    on the pods it already keeps busy instead of spreading them over the others' pods."""
    d, _eps, clock, _ = make(2, flow={"saturationDetector": ROOMY, **WORK})
    a0 = fresh_req("a0", "a", 50)
    assert isinstance(d.submit(a0), Decision) and not a0.over_share
    heavy = [fresh_req(f"b{i}", "b", 4_000) for i in range(3)]
    for b in heavy:
        assert isinstance(d.submit(b), Decision)
        clock.t += 0.01
    assert [b.over_share for b in heavy] == [False, True, True]
    a1 = fresh_req("a1", "a", 50)
    d.submit(a1)
    assert not a1.over_share
    lone, _, _, _ = make(2, flow={"saturationDetector": ROOMY, **WORK})
    alone = [fresh_req(f"c{i}", "c", 4_000) for i in range(3)]
    for c in alone:
        lone.submit(c)
    assert not any(c.over_share for c in alone)


def test_share_of_capacity_must_be_a_non_negative_number() -> None:
    for bad, message in (("x", "must be a number"), (-1, "must not be negative")):
        plugins = [{"name": "wf", "type": "work-fairness-policy",
                    "parameters": {"shareOfCapacity": bad}}]  # fmt: skip
        flow = {"defaultPriorityBand": {"fairnessPolicyRef": "wf"}}
        with pytest.raises(ConfigError, match=message):
            build_request_control(config_text(flow, plugins))
