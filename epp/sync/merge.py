"""The peers' contributions to this instance's view, kept apart per origin.

Every origin (another replica or worker) sends its own load per endpoint as absolute
values. `PeerView` keeps the latest value per (origin, endpoint) with the batch sequence
number that set it, and folds the sum over origins into `Endpoint.inflight`, next to the
local counts, so every scorer, filter and metric reads the pool-wide load without knowing
about replicas. Rules (see protos/epp/sync/v1/sync.proto):

* (origin, epoch) identifies an incarnation: a larger epoch drops the old contribution whole;
  a smaller one is ignored;
* an entry is applied only if its batch's seq is larger than the seq that set the current
  value (duplicates and reordering are harmless);
* a snapshot zeroes the keys it does not list that were set by an older batch (lost batches
  are repaired by the next snapshot);
* an origin silent for `expiry_s` is dropped whole (its requests are assumed gone with it);
* prefix inserts go into the local prefix index as they come (set additions, idempotent);
* P/D transfers in flight follow the load rules, per (endpoint, first block), and are added
  to the prefix index's peers' transfers (`PrefixIndex.peer_transfers`);
* prefill charges (the uncached tokens the origin queued per endpoint) are charged into the
  latency model's fluid prefill queues, once: only from a batch newer than any seen from
  that origin;
* precise speculations become the precise prefix index's speculative entries, as they
  come.

Peer queue depths (flow control) are summed per (band, flow) in `queue_totals()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from epp import clock as model_clock
from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint
from epp.scheduling.latency_model import LatencyModel
from epp.scheduling.precise_index import PreciseIndex
from epp.scheduling.prefix_index import PrefixIndex
from epp.sync.ledger import LOAD_FIELDS, ZERO_LOAD, Load, QueueKey, TransitKey
from epp.sync.v1 import sync_pb2 as pb

APPLIED = "applied"
STALE_EPOCH = "stale-epoch"
SELF = "self"
GOODBYE = "goodbye"


@dataclass(slots=True)
class OriginState:
    origin: str
    epoch: int
    loads: dict[str, tuple[int, Load]] = field(default_factory=dict)  # key -> (seq, load)
    queues: dict[QueueKey, tuple[int, tuple[int, int]]] = field(default_factory=dict)
    transit: dict[TransitKey, tuple[int, int]] = field(default_factory=dict)  # -> (seq, n)
    max_seq: int = 0
    last_seen: float = 0.0  # monotonic
    lag_s: float = 0.0  # sent_at -> received, last batch (wall clocks: skew included)
    batches: int = 0
    gaps: int = 0  # batches skipped in the sequence (repaired by the next snapshot)


def _sub(a: Load, b: Load) -> Load:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3], a[4] - b[4], a[5] - b[5])


def _add(a: Load, b: Load) -> Load:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4], a[5] + b[5])


def load_from_pb(e: pb.EndpointLoad) -> Load:
    return (
        e.requests,
        e.tokens,
        e.prefill_requests,
        e.prefill_tokens,
        e.pending_requests,
        e.pending_prefill_tokens,
    )


class PeerView:
    def __init__(
        self,
        datastore: Datastore,
        prefix_index: PrefixIndex | None,
        self_origin: str,
        *,
        latency: LatencyModel | None = None,
        precise: PreciseIndex | None = None,
        expiry_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.datastore = datastore
        self.prefix_index = prefix_index
        self.latency = latency
        self.precise = precise
        self.self_origin = self_origin
        self.expiry_s = expiry_s
        self.clock = clock
        self.wall = wall
        self.origins: dict[str, OriginState] = {}
        self._sum: dict[str, Load] = {}  # endpoint key -> peers' total
        # What has been added to each Endpoint object's counters, and to which object (an
        # endpoint removed and added again is a new object that starts from zero).
        self._applied: dict[str, tuple[Endpoint, Load]] = {}
        self.expired = 0
        self.gaps = 0  # batches missing in origins' sequences, all time
        self.prefix_blocks = 0
        self.prefill_charges = 0  # peers' prefill charges applied, all time
        datastore.on_endpoint_added(lambda ep: self._fold(ep.key))
        datastore.on_endpoint_removed(self._forget_endpoint)

    def _forget_endpoint(self, ep: Endpoint) -> None:
        self._applied.pop(ep.key, None)

    # ---- merging ---------------------------------------------------------------------------
    def apply(self, b: pb.SyncBatch) -> str:
        origin = b.origin
        if origin == self.self_origin:
            return SELF
        st = self.origins.get(origin)
        if st is not None and b.epoch < st.epoch:
            return STALE_EPOCH
        if st is not None and b.epoch > st.epoch:
            self.drop(origin)
            st = None
        if b.goodbye:
            if st is not None:
                self.drop(origin)
            return GOODBYE
        if st is None:
            st = self.origins[origin] = OriginState(origin, b.epoch)
        seq = b.seq
        fresh = seq > st.max_seq
        if st.max_seq and seq > st.max_seq + 1:
            st.gaps += seq - st.max_seq - 1
            self.gaps += seq - st.max_seq - 1
        st.max_seq = max(st.max_seq, seq)
        st.last_seen = self.clock()
        if b.sent_at:
            st.lag_s = max(0.0, self.wall() - b.sent_at)
        st.batches += 1

        listed: set[str] | None = set() if b.snapshot else None
        for e in b.inflight:
            key = e.endpoint
            if listed is not None:
                listed.add(key)
            cur = st.loads.get(key)
            if cur is not None and cur[0] >= seq:
                continue
            self._set(st, key, seq, load_from_pb(e))
        if listed is not None:
            for key in [k for k, (s, _) in st.loads.items() if k not in listed and s < seq]:
                self._set(st, key, seq, ZERO_LOAD)

        qlisted: set[QueueKey] | None = set() if b.snapshot else None
        for q in b.queues:
            qkey = (q.band, q.flow)
            if qlisted is not None:
                qlisted.add(qkey)
            qcur = st.queues.get(qkey)
            if qcur is None or qcur[0] < seq:
                st.queues[qkey] = (seq, (q.requests, q.bytes))
        if qlisted is not None:
            for qkey in [k for k, (s, _) in st.queues.items() if k not in qlisted and s < seq]:
                del st.queues[qkey]

        tlisted: set[TransitKey] | None = set() if b.snapshot else None
        for t in b.transit:
            tkey = (t.endpoint, t.first)
            if tlisted is not None:
                tlisted.add(tkey)
            tcur = st.transit.get(tkey)
            if tcur is None or tcur[0] < seq:
                self._set_transit(st, tkey, seq, t.requests)
        if tlisted is not None:
            for tkey in [k for k, (s, _) in st.transit.items() if k not in tlisted and s < seq]:
                self._set_transit(st, tkey, seq, 0)

        if b.prefix and self.prefix_index is not None:
            get = self.datastore.get
            insert = self.prefix_index.insert
            for p in b.prefix:
                ep = get(p.endpoint)
                if ep is not None:
                    hashes = list(p.hashes)
                    insert(ep, hashes)
                    self.prefix_blocks += len(hashes)
        if fresh and b.prefill_charges and self.latency is not None:
            get = self.datastore.get
            charge = self.latency.charge_backlog
            now = model_clock.now()  # the latency model's time base
            for c in b.prefill_charges:
                ep = get(c.endpoint)
                if ep is not None and c.tokens > 0:
                    charge(ep, c.tokens, now)
                    self.prefill_charges += 1
        if b.precise and self.precise is not None:
            for p in b.precise:
                self.precise.speculate(p.endpoint, list(p.hashes), local=False)
        return APPLIED

    def _set(self, st: OriginState, key: str, seq: int, load: Load) -> None:
        old = st.loads.get(key)
        old_load = old[1] if old is not None else ZERO_LOAD
        if load == ZERO_LOAD:
            # Keep the seq so an older, reordered batch cannot bring the value back.
            st.loads[key] = (seq, ZERO_LOAD)
        else:
            st.loads[key] = (seq, load)
        if load != old_load:
            total = _add(self._sum.get(key, ZERO_LOAD), _sub(load, old_load))
            if total == ZERO_LOAD:
                self._sum.pop(key, None)
            else:
                self._sum[key] = total
            self._fold(key)

    def _set_transit(self, st: OriginState, tkey: TransitKey, seq: int, n: int) -> None:
        old = st.transit.get(tkey, (0, 0))[1]
        st.transit[tkey] = (seq, n)  # a zero keeps its seq, as loads do
        if n != old and self.prefix_index is not None:
            self.prefix_index.peer_transfers(tkey[0], tkey[1], n - old)

    def _fold(self, key: str) -> None:
        """Make the endpoint's counters hold local + peers' total for `key`."""
        ep = self.datastore.get(key)
        if ep is None:
            self._applied.pop(key, None)
            return
        target = self._sum.get(key, ZERO_LOAD)
        applied = self._applied.get(key)
        base = applied[1] if applied is not None and applied[0] is ep else ZERO_LOAD
        if base != target:
            inf = ep.inflight
            for name, d in zip(LOAD_FIELDS, _sub(target, base), strict=True):
                if d:
                    setattr(inf, name, getattr(inf, name) + d)
        if target == ZERO_LOAD:
            self._applied.pop(key, None)
        else:
            self._applied[key] = (ep, target)

    # ---- membership ------------------------------------------------------------------------
    def drop(self, origin: str) -> None:
        """Forget an origin's contribution entirely (expired, restarted or said goodbye)."""
        st = self.origins.pop(origin, None)
        if st is None:
            return
        if self.prefix_index is not None:
            for (key, first), (_, n) in st.transit.items():
                if n:
                    self.prefix_index.peer_transfers(key, first, -n)
        for key, (_, load) in st.loads.items():
            if load != ZERO_LOAD:
                total = _sub(self._sum.get(key, ZERO_LOAD), load)
                if total == ZERO_LOAD:
                    self._sum.pop(key, None)
                else:
                    self._sum[key] = total
                self._fold(key)

    def expire(self, now: float | None = None) -> list[str]:
        now = self.clock() if now is None else now
        gone = [o for o, st in self.origins.items() if now - st.last_seen > self.expiry_s]
        for o in gone:
            self.drop(o)
        self.expired += len(gone)
        return gone

    # ---- reads -----------------------------------------------------------------------------
    def peer_load(self, key: str) -> Load:
        return self._sum.get(key, ZERO_LOAD)

    def staleness(self, now: float | None = None) -> dict[str, float]:
        """Seconds since each origin was last heard from."""
        now = self.clock() if now is None else now
        return {o: now - st.last_seen for o, st in self.origins.items()}

    def queue_totals(self) -> dict[QueueKey, tuple[int, int]]:
        """Peers' queued requests and bytes per (band, flow)."""
        out: dict[QueueKey, tuple[int, int]] = {}
        for st in self.origins.values():
            for k, (_, (n, size)) in st.queues.items():
                cur = out.get(k, (0, 0))
                out[k] = (cur[0] + n, cur[1] + size)
        return out
