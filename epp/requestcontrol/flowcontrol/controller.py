"""The flow controller: admit now, or queue in the EPP and dispatch when capacity frees.

Plain method calls on one thread, with an injectable clock (default: `epp.clock`), so the
same object runs under asyncio (`aio.py` adds the waiting) and under a discrete-event
simulator in virtual time:

* `submit(admitted)` → a `Decision` when the request can go now (nothing of its priority or
  higher is waiting and one of its endpoints has room), else a queued `Ticket`; raises a
  429 `RequestError` when the band or the whole queue is full;
* `pump()` dispatches what capacity allows: bands strictly by priority, the band's fairness
  policy picks the flow, its ordering policy the request, and the request is scheduled at
  that moment on the endpoints that have room (late binding). Call it when capacity may
  have freed: a request's prefill finished or it ended (the `FlowDispatchHook` does),
  scraped load dropped (a periodic tick), or at `next_expiry()` to reject what waited too
  long;
* `cancel(ticket)`: the client went away; a ticket already dispatched is released.

Scheduling is delegated to a `Binder` (the Director): it recomputes the candidates at
dispatch time and schedules on a given endpoint subset.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from epp import clock as epp_clock
from epp.datalayer.endpoint import Endpoint
from epp.requestcontrol.decision import Admitted, Decision
from epp.requestcontrol.errors import RequestError, rate_limited, unavailable
from epp.requestcontrol.flowcontrol.config import FlowControlSettings
from epp.requestcontrol.flowcontrol.queue import (
    Band,
    FlowEntry,
    Place,
    Ticket,
    TicketState,
    place_of,
)
from epp.scheduling.framework import SchedulingError, SchedulingResult

log = logging.getLogger(__name__)

DEFAULT_FLOW = "default"
CAPACITY_TTL_S = 0.1  # how long a pool's prefill capacity is reused


class Binder(Protocol):
    def candidates(self, admitted: Admitted) -> list[Endpoint]:
        """The request's candidate endpoints now; raises RequestError if there are none."""

    def schedule_on(self, admitted: Admitted, endpoints: list[Endpoint]) -> Decision:
        """Schedule on `endpoints`; raises SchedulingError if none of them fits."""

    def plan(self, admitted: Admitted, endpoints: list[Endpoint]) -> SchedulingResult:
        """The pick on `endpoints` without charging it; raises SchedulingError."""

    def commit(self, admitted: Admitted, result: SchedulingResult) -> Decision:
        """Send the request where `result` says (charges it)."""

    def release(self, decision: Decision) -> None: ...

    def endpoints(self) -> Sequence[Endpoint]:
        """Every endpoint of the pool (to see cheaply that none has room)."""

    def work_estimate(self, admitted: Admitted) -> float:
        """The work a request brings, in prefill-token equivalents (for work fairness)."""

    def prefill_capacity(self, endpoints: Sequence[Endpoint]) -> float:
        """Prefill tokens per second the ready ones of `endpoints` can take together."""


class FlowObserver(Protocol):
    """Where the controller reports outcomes (metrics)."""

    def dispatched(self, priority: int, business: str, wait_s: float, queued: bool) -> None: ...
    def rejected(self, priority: int, business: str, reason: str, wait_s: float) -> None: ...
    def cancelled(self, priority: int, business: str, wait_s: float) -> None: ...


class FlowController:
    def __init__(
        self,
        settings: FlowControlSettings,
        binder: Binder,
        *,
        clock: Callable[[], float] | None = None,
        observer: FlowObserver | None = None,
        fairness_header: str = "x-gateway-inference-fairness-id",
    ) -> None:
        self.settings = settings
        self.detector = settings.detector
        self.binder = binder
        # None: the product's clock seam (`epp.clock`), read at each call
        self.clock = clock or (lambda: epp_clock.now())
        self.observer = observer
        self.fairness_header = fairness_header
        self.bands: dict[int, Band] = {}
        self._order: list[Band] = []  # highest priority first
        self.queued = 0
        self.queued_bytes = 0
        # queued requests per (priority, business): what the queue-size gauge reports
        self.sizes: dict[tuple[int, str], int] = {}
        self._expiry: list[tuple[float, int, Ticket]] = []
        self._seq = 0
        self._capacities: dict[tuple[str, frozenset[str] | None], tuple[float, float]] = {}
        self._pumping = False
        self._again = False
        self.successor: FlowController | None = None  # set when a reload replaced this one

    # ---- entry points ------------------------------------------------------------------------
    def submit(self, admitted: Admitted) -> Decision | Ticket:
        req = admitted.request
        prio = req.priority
        now = self.clock()
        band = self._band(prio)
        flow_id = self._flow_id(admitted)
        fairness = band.settings.fairness
        cost = self.binder.work_estimate(admitted) if fairness.uses_work else 1.0
        if fairness.capacity_share > 0.0:
            band.record_arrival(flow_id, cost, now)
        decision: Decision | None = None
        if fairness.bypass_within_share:
            # Also read by the scorers: a tenant over its share keeps its own queue.
            req.over_share = band.over_share(flow_id, now)
        if (
            fairness.bypass_within_share
            and prio >= 0  # sheddable requests always wait for room
            and not req.over_share
            and flow_id not in band.flows  # nothing of it queued
            and not self._waiting_above(prio)
        ):
            # A tenant within its share does not wait behind the saturation others cause
            # (nor, alone, behind its own: holding it would only delay it): it goes to the
            # pod that serves it best now. Tenants over their share wait for room.
            try:
                decision = self.binder.schedule_on(admitted, admitted.candidates)
            except SchedulingError as e:
                raise unavailable(str(e)) from e
        behind_others = decision is None and self._waiting_at_or_above(prio)
        if (
            decision is None
            and not behind_others
            and not self._over_capacity_share(band, flow_id, admitted, admitted.candidates, now)
        ):
            decision = self._try_now(admitted, admitted.candidates, now)
        if decision is not None:
            band.record_work(flow_id, cost, now)
            if self.observer is not None:
                self.observer.dispatched(prio, req.business or "", 0.0, False)
            return decision
        size = len(req.prompt)
        s = self.settings
        reason = ""
        if band.full_for(size):
            reason = "band_full"
        elif (s.max_requests and self.queued >= s.max_requests) or (
            s.max_bytes and self.queued_bytes + size > s.max_bytes
        ):
            reason = "queue_full"
        if reason:
            if self.observer is not None:
                self.observer.rejected(prio, req.business or "", reason, 0.0)
            what = "priority band" if reason == "band_full" else "queue"
            raise rate_limited(
                f"the pool is saturated and the {what} is full", self._retry_after(band)
            )
        self._seq += 1
        t = Ticket(admitted, prio, flow_id, self._seq, now, band.settings.ttl_s, self)
        t.cost = cost
        band.add(t)
        self.queued += 1
        self.queued_bytes += t.size
        key = (prio, t.business)
        self.sizes[key] = self.sizes.get(key, 0) + 1
        if t.expires_at < math.inf:
            heapq.heappush(self._expiry, (t.expires_at, t.seq, t))
        if behind_others:
            # In turn behind the waiting ones, but those may be blocked on other endpoints
            # (another business or model) while this one's have room.
            self.pump()
            if t.state is TicketState.DISPATCHED and t.decision is not None:
                return t.decision
            if t.error is not None:
                raise t.error
        return t

    def cancel(self, t: Ticket) -> None:
        """The request's client is gone. Idempotent; releases a dispatched decision."""
        if t.state is TicketState.QUEUED:
            self._unqueue(t)
            t.state = TicketState.CANCELLED
            t.wait_s = self.clock() - t.enqueued_at
            if self.observer is not None:
                self.observer.cancelled(t.priority, t.business, t.wait_s)
            self._drop_expiry_garbage()
        elif t.state is TicketState.DISPATCHED and t.decision is not None:
            t.state = TicketState.CANCELLED
            self.binder.release(t.decision)

    def pump(self) -> int:
        """Expire what waited too long, then dispatch while capacity allows; returns the
        number dispatched. Re-entrant calls (a dispatch that frees capacity) are folded in."""
        if self._pumping:
            self._again = True
            return 0
        self._pumping = True
        n = 0
        try:
            while True:
                self._again = False
                now = self.clock()
                self._expire(now)
                if self.queued:
                    n += self._dispatch_round(now)
                if not self._again:
                    return n
        finally:
            self._pumping = False
            self._drop_expiry_garbage()

    def next_expiry(self) -> float | None:
        """When the earliest queued request times out (for a simulator's event queue)."""
        self._drop_expiry_garbage()
        return self._expiry[0][0] if self._expiry else None

    def adopt(self, old: FlowController) -> None:
        """Take over `old`'s queued tickets (a config reload), keeping their order."""
        old.successor = self
        moved = sorted(old.tickets(), key=lambda t: t.seq)
        for t in moved:
            old._unqueue(t)
        for t in moved:
            band = self._band(t.priority)
            self._seq += 1
            t.seq = self._seq
            t.controller = self
            band.add(t)
            self.queued += 1
            self.queued_bytes += t.size
            key = (t.priority, t.business)
            self.sizes[key] = self.sizes.get(key, 0) + 1
            if t.expires_at < math.inf:
                heapq.heappush(self._expiry, (t.expires_at, t.seq, t))

    def tickets(self) -> Iterator[Ticket]:
        for band in self._order:
            for flow in band.flows.values():
                for _, t in flow.heap:
                    if t.queued:
                        yield t

    # ---- internals -----------------------------------------------------------------------------
    def _flow_id(self, admitted: Admitted) -> str:
        req = admitted.request
        return req.headers.get(self.fairness_header) or req.business or DEFAULT_FLOW

    def _band(self, priority: int) -> Band:
        band = self.bands.get(priority)
        if band is None:
            band = Band(self.settings.band(priority))
            self.bands[priority] = band
            self._order = sorted(self.bands.values(), key=lambda b: -b.priority)
        return band

    def _waiting_above(self, priority: int) -> bool:
        return any(band.count for band in self._order if band.priority > priority)

    def _waiting_at_or_above(self, priority: int) -> bool:
        if not self.queued:
            return False
        for band in self._order:
            if band.priority < priority:
                return False
            if band.count:
                return True
        return False

    def _over_capacity_share(
        self,
        band: Band,
        flow_id: str,
        admitted: Admitted,
        candidates: Sequence[Endpoint],
        now: float,
    ) -> bool:
        """The flow must wait although pods may have room: see `Band.over_capacity_share`."""
        if band.settings.fairness.capacity_share <= 0.0 or (
            len(band.work_rates) < 2 and not band.flows
        ):
            return False
        return band.over_capacity_share(flow_id, now, self._capacity(admitted, candidates, now))

    def _capacity(self, admitted: Admitted, candidates: Sequence[Endpoint], now: float) -> float:
        """The candidates' prefill capacity, recomputed at most every `CAPACITY_TTL_S` per
        model and subset: it moves with scrapes, and summing it is a pass over the pool."""
        req = admitted.request
        key = (req.routed_model, req.subset)
        got = self._capacities.get(key)
        if got is not None and now - got[1] < CAPACITY_TTL_S:
            return got[0]
        capacity = self.binder.prefill_capacity(candidates)
        if len(self._capacities) > 1024:
            self._capacities.clear()
        self._capacities[key] = (capacity, now)
        return capacity

    def _try_now(
        self, admitted: Admitted, candidates: list[Endpoint], now: float
    ) -> Decision | None:
        """Schedule now if the request's best placement has room; None when it must wait
        (late binding: it is placed again when capacity frees). The pick is made over all
        its candidates, not only those with room, so that a full pod holding its prefix is
        waited for rather than traded for a cold one."""
        if not self.detector.available(candidates, now):
            return None
        try:
            result = self.binder.plan(admitted, candidates)
        except SchedulingError as e:
            raise unavailable(str(e)) from e
        has_room = self.detector.has_room
        if not has_room(result.target, now) or (
            result.prefill is not None and not has_room(result.prefill, now)
        ):
            return None
        return self.binder.commit(admitted, result)

    def _dispatch_round(self, now: float) -> int:
        """One pass over the bands, highest first; inside a band, flows in fairness order. A
        flow whose head cannot go is skipped for the rest of the pass (dispatching only
        uses capacity up), a place (model, subset, business) found full is remembered,
        and a band is left as soon as every place it has requests for is full: a pass over
        a saturated pool costs a few heap operations, not one look per waiting request."""
        if not self._any_room(now):
            return 0
        n = 0
        full: set[Place] = set()
        for band in self._order:
            if not band.count or all(p in full for p in band.places):
                continue
            skipped: list[FlowEntry] = []
            while True:
                entry = band.next_flow()
                if entry is None:
                    break
                flow = entry[3]
                t = flow.head()
                place = place_of(t)
                if place in full:
                    skipped.append(entry)
                    continue
                try:
                    candidates = self.binder.candidates(t.admitted)
                    if self._over_capacity_share(band, flow.flow_id, t.admitted, candidates, now):
                        skipped.append(entry)  # this flow waits; others may go
                        continue
                    decision = self._try_now(t.admitted, candidates, now)
                except RequestError as e:
                    self._finish_rejected(band, t, e, "unschedulable", now)
                    continue
                except Exception:  # a bug must not strand the queue
                    log.exception("flow control: dispatch failed")
                    err = RequestError(
                        500, "internal error in the endpoint picker", "internal_error"
                    )
                    self._finish_rejected(band, t, err, "error", now)
                    continue
                if decision is None:
                    full.add(place)
                    skipped.append(entry)
                    if all(p in full for p in band.places):
                        break
                    continue
                band.pop(flow)
                band.record_work(flow.flow_id, t.cost, now)
                self._left_queue(t)
                self._finish_dispatched(band, t, decision, now)
                n += 1
                if not self._any_room(now):
                    for entry in skipped:
                        band.push_back(entry)
                    return n
            for entry in skipped:
                band.push_back(entry)
        return n

    def _any_room(self, now: float) -> bool:
        """Some ready endpoint has room, or none is ready (then the pass answers 503s)."""
        has_room = self.detector.has_room
        ready = False
        for ep in self.binder.endpoints():
            if ep.ready:
                if has_room(ep, now):
                    return True
                ready = True
        return not ready

    def _finish_dispatched(self, band: Band, t: Ticket, decision: Decision, now: float) -> None:
        t.state = TicketState.DISPATCHED
        t.decision = decision
        t.wait_s = decision.queue_wait_s = now - t.enqueued_at
        band.ewma_wait_s += 0.2 * (t.wait_s - band.ewma_wait_s)
        if self.observer is not None:
            self.observer.dispatched(t.priority, t.business, t.wait_s, True)
        if t.on_done is not None:
            t.on_done(t)

    def dispatch_all(self) -> None:
        """Dispatch every queued request now, capacity or not (flow control turned off)."""
        now = self.clock()
        for t in sorted(self.tickets(), key=lambda t: (-t.priority, t.seq)):
            band = self.bands[t.priority]
            try:
                candidates = self.binder.candidates(t.admitted)
                decision = self.binder.schedule_on(t.admitted, candidates)
            except SchedulingError as e:
                self._finish_rejected(band, t, unavailable(str(e)), "unschedulable", now)
                continue
            except RequestError as e:
                self._finish_rejected(band, t, e, "unschedulable", now)
                continue
            self._unqueue(t)
            self._finish_dispatched(band, t, decision, now)

    def _finish_rejected(
        self, band: Band, t: Ticket, error: RequestError, reason: str, now: float
    ) -> None:
        self._unqueue(t)
        t.state = TicketState.REJECTED
        t.error = error
        t.wait_s = now - t.enqueued_at
        if self.observer is not None:
            self.observer.rejected(t.priority, t.business, reason, t.wait_s)
        if t.on_done is not None:
            t.on_done(t)

    def _expire(self, now: float) -> None:
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, _, t = heapq.heappop(heap)
            if not t.queued:
                continue
            band = self.bands[t.priority]
            waited = now - t.enqueued_at
            self._finish_rejected(
                band,
                t,
                rate_limited(
                    f"the request waited {waited:.1f} s in the EPP's queue without capacity "
                    "freeing up",
                    self._retry_after(band),
                ),
                "ttl",
                now,
            )

    def _unqueue(self, t: Ticket) -> None:
        self.bands[t.priority].discard(t)
        self._left_queue(t)

    def _left_queue(self, t: Ticket) -> None:
        self.queued -= 1
        self.queued_bytes -= t.size
        self.sizes[(t.priority, t.business)] -= 1

    def _drop_expiry_garbage(self) -> None:
        heap = self._expiry
        while heap and not heap[0][2].queued:
            heapq.heappop(heap)
        if len(heap) > 2 * self.queued + 64:
            self._expiry = [e for e in heap if e[2].queued]
            heapq.heapify(self._expiry)

    @staticmethod
    def _retry_after(band: Band) -> int:
        """Seconds a client should wait before retrying: about one typical queue wait."""
        return max(1, min(60, math.ceil(band.ewma_wait_s)))
