"""Queued requests: tickets, per-flow heaps and priority bands (data structures only).

A `Band` holds the non-empty flows of one priority; a `Flow` is one tenant's heap ordered
by the band's ordering policy. A ticket leaving the queue in the middle (cancelled,
expired) is removed from the counts at once and from its heap lazily; a flow that empties
is dropped with its heap, so nothing outlives the requests it held.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any

from epp.requestcontrol.decision import Admitted, Decision
from epp.requestcontrol.errors import RequestError

if TYPE_CHECKING:
    from epp.requestcontrol.flowcontrol.config import BandSettings


class TicketState(Enum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    REJECTED = "rejected"
    CANCELLED = "cancelled"


class Ticket:
    """A request waiting in the EPP. Ends DISPATCHED (`decision`), REJECTED (`error`) or
    CANCELLED; `on_done` is called once when it leaves the queue other than by cancel."""

    __slots__ = (
        "admitted",
        "business",
        "controller",
        "cost",
        "decision",
        "enqueued_at",
        "error",
        "expires_at",
        "flow_id",
        "on_done",
        "priority",
        "seq",
        "size",
        "state",
        "wait_s",
    )

    def __init__(
        self,
        admitted: Admitted,
        priority: int,
        flow_id: str,
        seq: int,
        now: float,
        ttl_s: float,
        controller: Any = None,
    ) -> None:
        req = admitted.request
        self.admitted = admitted
        self.priority = priority
        self.flow_id = flow_id
        self.business = req.business or ""
        self.size = len(req.prompt)
        self.seq = seq
        self.enqueued_at = now
        self.expires_at = now + ttl_s if ttl_s > 0 else math.inf
        self.state = TicketState.QUEUED
        self.decision: Decision | None = None
        self.error: RequestError | None = None
        self.on_done: Callable[[Ticket], None] | None = None
        self.controller = controller
        self.wait_s = 0.0
        # What dispatching it costs its flow's fair share (see fairness.py): 1 = a request.
        self.cost = 1.0

    @property
    def slo_ttft_ms(self) -> float | None:
        return self.admitted.request.slo_ttft_ms

    @property
    def queued(self) -> bool:
        return self.state is TicketState.QUEUED

    def __lt__(self, other: Ticket) -> bool:  # heap tie-break (keys include seq: never used)
        return self.seq < other.seq

    def __repr__(self) -> str:
        return (
            f"Ticket({self.admitted.request.request_id!r}, p={self.priority}, {self.state.value})"
        )


WORK_RATE_TAU_S = 5.0  # time constant of the per-flow dispatched-work rate
CAPACITY_BURST_S = 10.0  # how far ahead of its capacity share a flow may run
# A flow is flooding (and held to its capacity share) while the work it sends exceeds its
# share by this factor: one sending about its share is never held on an estimate's error.
FLOOD_FACTOR = 1.5
ARRIVAL_TAU_S = 10.0  # time constant of the per-flow arriving-work rate
ACTIVE_AFTER_DISPATCH_S = 2 * WORK_RATE_TAU_S


def _decayed(rate: float, dt: float, tau: float = WORK_RATE_TAU_S) -> float:
    return rate * math.exp(-dt / tau) if dt > 0 else rate


def _add_to_rate(
    rates: dict[str, tuple[float, float]], key: str, amount: float, now: float, tau: float
) -> dict[str, tuple[float, float]]:
    """`rates[key]` (a decaying rate, as of a time) with `amount` added at `now`; the table
    returned drops the keys quiet for 4 tau once it holds over 4096."""
    rate, at = rates.get(key, (0.0, now))
    rates[key] = (_decayed(rate, now - at, tau) + amount / tau, now)
    if len(rates) > 4096:
        return {k: (r, a) for k, (r, a) in rates.items() if now - a < 4 * tau}
    return rates


def _refilled(credit: float, dt: float, fill: float) -> float:
    """A capacity-share bucket's credit after `dt` seconds of filling at `fill` per second."""
    return min(fill * CAPACITY_BURST_S, credit + fill * dt)


class Flow:
    __slots__ = ("finish", "flow_id", "heap", "key", "live", "order", "version")

    def __init__(self, flow_id: str, finish: float, order: int) -> None:
        self.flow_id = flow_id
        self.heap: list[tuple[tuple[float, int], Ticket]] = []
        self.live = 0
        self.finish = finish
        self.order = order
        self.version = 0  # bumped when the flow's place in the band's heap changes
        self.key: tuple[float, int] | None = None

    def _trim(self) -> None:
        heap = self.heap
        while heap and not heap[0][1].queued:
            heapq.heappop(heap)

    def head(self) -> Ticket:
        self._trim()
        return self.heap[0][1]

    def head_key(self) -> tuple[float, int]:
        self._trim()
        return self.heap[0][0]


# Where a queued request may go: (routed model, subset hint, business). Requests with the
# same place are blocked together when it is full.
Place = tuple[str, frozenset[str] | None, str]


def place_of(t: Ticket) -> Place:
    req = t.admitted.request
    return (req.routed_model, req.subset, t.business)


# An entry of a band's flow heap: (fairness key, activation order, flow version, flow).
FlowEntry = tuple[tuple[float, int], int, int, Flow]


class Band:
    """One priority level: its flows, counts and the policies that order them.

    The flows sit in a heap on their fairness key; an entry whose flow changed since is
    stale and skipped. `places` counts the queued requests per place, so a dispatch pass
    can stop as soon as every place with waiting requests is known to be full."""

    def __init__(self, settings: BandSettings) -> None:
        self.settings = settings
        self.priority = settings.priority
        self.flows: dict[str, Flow] = {}
        self.heap: list[FlowEntry] = []
        self.places: dict[Place, int] = {}
        self.count = 0
        self.bytes = 0
        self.vtime = 0.0  # finish time of the flow that dispatched last
        # Recent dispatched work per flow (decaying rate, as of a time), for `over_share`.
        self.work_rates: dict[str, tuple[float, float]] = {}
        # Per flow, for `over_capacity_share`: (credit in work units, as of, fill rate), and
        # the work arriving (decaying rate, as of).
        self.credit: dict[str, tuple[float, float, float]] = {}
        self.arrivals: dict[str, tuple[float, float]] = {}
        self._activations = 0
        self.ewma_wait_s = 0.0  # of dispatched requests: the retry-after hint

    def full_for(self, size: int) -> bool:
        s = self.settings
        return self.count >= s.max_requests or self.bytes + size > s.max_bytes

    def record_work(self, flow_id: str, work: float, now: float) -> None:
        """A request of `flow_id` bringing `work` was dispatched (from the queue or not)."""
        rates = _add_to_rate(self.work_rates, flow_id, work, now, WORK_RATE_TAU_S)
        if rates is not self.work_rates:  # quiet flows forgotten: their credit goes too
            self.work_rates = rates
            self.credit = {k: v for k, v in self.credit.items() if k in rates}
        got = self.credit.get(flow_id)
        if got is not None:
            credit, at, fill = got
            credit = _refilled(credit, now - at, fill) - work
            self.credit[flow_id] = (max(credit, -fill * CAPACITY_BURST_S), now, fill)

    def record_arrival(self, flow_id: str, work: float, now: float) -> None:
        """A request of `flow_id` bringing `work` arrived (queued or not)."""
        self.arrivals = _add_to_rate(self.arrivals, flow_id, work, now, ARRIVAL_TAU_S)

    def over_share(self, flow_id: str, now: float) -> bool:
        """The flow is taking more than its weighted share of the work the band dispatched
        lately (a flow alone in the band never is). A flow within its share with nothing
        queued need not wait for a pod with room; only flows over their share do."""
        fairness = self.settings.fairness
        total = 0.0
        weights = 0.0
        mine = 0.0
        others = False
        for fid, (rate, at) in self.work_rates.items():
            r = _decayed(rate, now - at)
            if r <= 1e-9:
                continue
            w = fairness.weight(fid)
            total += r
            weights += w
            if fid == flow_id:
                mine = r / w
            else:
                others = True
        if not others:
            return False
        if mine == 0.0:
            weights += fairness.weight(flow_id)
        return mine >= total / weights

    def over_capacity_share(self, flow_id: str, now: float, capacity: float) -> bool:
        """While other flows are active (queued, or dispatched in the last
        `ACTIVE_AFTER_DISPATCH_S`: a tenant that left soon stops holding the others back),
        the flow has used up its credit: a token bucket filled at its weighted share of
        `capacity` (the pool's prefill tokens per second) times the policy's
        `capacity_share`, holding `CAPACITY_BURST_S` of it, and drained by the work the
        flow dispatches, and the flow is flooding: the work it sends (arriving, decaying
        over `ARRIVAL_TAU_S`) is over `FLOOD_FACTOR` x that fill rate. A flow near its share
        is never held; a flood is held to the share."""
        fairness = self.settings.fairness
        factor = fairness.capacity_share
        if factor <= 0.0 or capacity <= 0.0:
            return False
        others = {
            fid for fid, (_, at) in self.work_rates.items() if now - at <= ACTIVE_AFTER_DISPATCH_S
        }
        others.update(self.flows)
        others.discard(flow_id)
        if not others:
            self.credit.pop(flow_id, None)  # alone: it starts with full credit next time
            return False
        mine = fairness.weight(flow_id)
        rate = factor * capacity * mine / (mine + sum(map(fairness.weight, others)))
        sent, sent_at = self.arrivals.get(flow_id, (0.0, now))
        if _decayed(sent, now - sent_at, ARRIVAL_TAU_S) < FLOOD_FACTOR * rate:
            return False  # not flooding: its bursts and the estimate's error go through
        credit, at, _ = self.credit.get(flow_id, (math.inf, now, rate))
        credit = _refilled(credit, now - at, rate)
        self.credit[flow_id] = (credit, now, rate)
        return credit <= 0.0

    def add(self, t: Ticket) -> None:
        flow = self.flows.get(t.flow_id)
        if flow is None:
            self._activations += 1
            flow = Flow(t.flow_id, self.vtime, self._activations)
            self.flows[t.flow_id] = flow
        heapq.heappush(flow.heap, (self.settings.ordering.key(t), t))
        flow.live += 1
        self._counted(t, 1)
        self._reposition(flow)

    def discard(self, t: Ticket) -> None:
        """A queued ticket leaves other than by dispatch (cancel, expiry, rejection); call
        before changing its state."""
        self._counted(t, -1)
        flow = self.flows[t.flow_id]
        flow.live -= 1
        if flow.live == 0:
            del self.flows[t.flow_id]
            return
        if len(flow.heap) > 2 * flow.live + 16:
            flow.heap = [e for e in flow.heap if e[1].queued and e[1] is not t]
            heapq.heapify(flow.heap)
        elif flow.heap[0][1] is t:
            heapq.heappop(flow.heap)
        self._reposition(flow)

    def pop(self, flow: Flow) -> Ticket:
        """Take `flow`'s head for dispatch and advance the flow's virtual time."""
        t = flow.head()
        heapq.heappop(flow.heap)
        self._counted(t, -1)
        self.vtime = flow.finish
        fairness = self.settings.fairness
        flow.finish += fairness.cost(t) / fairness.weight(flow.flow_id)
        flow.live -= 1
        if flow.live == 0:
            del self.flows[flow.flow_id]
        else:
            self._reposition(flow)
        return t

    def next_flow(self) -> FlowEntry | None:
        """Pop the flow that dispatches next (its entry: push it back if it is skipped)."""
        heap = self.heap
        while heap:
            entry = heapq.heappop(heap)
            flow = entry[3]
            if entry[2] == flow.version and self.flows.get(flow.flow_id) is flow:
                return entry
        return None

    def push_back(self, entry: FlowEntry) -> None:
        heapq.heappush(self.heap, entry)

    def _reposition(self, flow: Flow) -> None:
        key = self.settings.fairness.key(flow)
        if key == flow.key:
            return
        flow.key = key
        flow.version += 1
        heap = self.heap
        heapq.heappush(heap, (key, flow.order, flow.version, flow))
        if len(heap) > 2 * len(self.flows) + 64:
            self.heap = [
                e for e in heap if e[2] == e[3].version and self.flows.get(e[3].flow_id) is e[3]
            ]
            heapq.heapify(self.heap)

    def _counted(self, t: Ticket, delta: int) -> None:
        self.count += delta
        self.bytes += delta * t.size
        place = place_of(t)
        n = self.places.get(place, 0) + delta
        if n:
            self.places[place] = n
        else:
            del self.places[place]
