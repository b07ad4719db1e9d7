"""Replica state sync: the merge rules (duplicate, reordered and lost batches; expiry;
rejoin), the fold into Endpoint.inflight next to local counts, and the ledger the
replica-sync hook keeps (the same charges as in-flight accounting)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp import clock as model_clock
from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint, InFlight
from epp.requestcontrol.config import build_request_control
from epp.requestcontrol.director import Director
from epp.requestcontrol.hooks.replica_sync import ReplicaSync
from epp.scheduling.latency_model import LatencyModel
from epp.scheduling.precise_index import PreciseIndex
from epp.scheduling.prefix_index import PrefixIndex
from epp.scheduling.request import InferenceRequest
from epp.sync.ledger import ZERO_LOAD, Load, LocalLedger, load_of
from epp.sync.merge import APPLIED, GOODBYE, SELF, STALE_EPOCH, PeerView
from epp.sync.node import SyncNode
from epp.sync.v1 import sync_pb2 as pb

A, B = "127.0.0.1:8000", "127.0.0.2:8000"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def setup(expiry: float = 2.0) -> tuple[Datastore, PeerView, Clock, PrefixIndex]:
    ds = Datastore()
    for key in (A, B):
        host, port = key.split(":")
        ds.upsert_endpoint("test", Endpoint(host, int(port)))
    clock = Clock()
    index = PrefixIndex()
    view = PeerView(ds, index, "me/0", expiry_s=expiry, clock=clock)
    return ds, view, clock, index


def batch(
    origin: str,
    seq: int,
    loads: dict[str, Load] | None = None,
    *,
    epoch: int = 1,
    snapshot: bool = False,
    prefix: dict[str, list[int]] | None = None,
    queues: dict[tuple[int, str], int] | None = None,
    transit: dict[tuple[str, int], int] | None = None,
    charges: dict[str, int] | None = None,
    goodbye: bool = False,
) -> pb.SyncBatch:
    b = pb.SyncBatch(origin=origin, epoch=epoch, seq=seq, snapshot=snapshot, goodbye=goodbye)
    for key, v in (loads or {}).items():
        b.inflight.add(
            endpoint=key,
            requests=v[0],
            tokens=v[1],
            prefill_requests=v[2],
            prefill_tokens=v[3],
            pending_requests=v[4],
            pending_prefill_tokens=v[5],
        )
    for key, hashes in (prefix or {}).items():
        b.prefix.add(endpoint=key, hashes=hashes)
    for (band, flow), n in (queues or {}).items():
        b.queues.add(band=band, flow=flow, requests=n)
    for (key, first), n in (transit or {}).items():
        b.transit.add(endpoint=key, first=first, requests=n)
    for key, tokens in (charges or {}).items():
        b.prefill_charges.add(endpoint=key, tokens=tokens)
    return b


def load(requests: int, tokens: int = 0, pending: int = 0) -> Load:
    return (requests, tokens, 0, 0, pending, 0)


def reqs(ds: Datastore, key: str) -> int:
    ep = ds.get(key)
    assert ep is not None
    return ep.inflight.requests


def test_peer_load_adds_to_local_counts() -> None:
    ds, view, _, _ = setup()
    ep = ds.get(A)
    assert ep is not None
    ep.inflight.requests = 3  # local charges
    assert view.apply(batch("p/0", 1, {A: load(2, 100)})) == APPLIED
    assert ep.inflight.requests == 5 and ep.inflight.tokens == 100
    view.apply(batch("p/0", 2, {A: load(1, 40)}))  # absolute values: 2 -> 1
    assert ep.inflight.requests == 4 and ep.inflight.tokens == 40
    view.apply(batch("q/0", 1, {A: load(2)}))
    assert ep.inflight.requests == 6
    assert view.peer_load(A)[0] == 3


def test_duplicate_batches_are_harmless() -> None:
    ds, view, _, _ = setup()
    b = batch("p/0", 1, {A: load(2)})
    for _ in range(3):
        view.apply(b)
    assert reqs(ds, A) == 2


def test_reordered_batches_keep_the_newest_value() -> None:
    ds, view, _, _ = setup()
    view.apply(batch("p/0", 3, {A: load(1)}))
    view.apply(batch("p/0", 2, {A: load(7)}))  # older: ignored
    assert reqs(ds, A) == 1
    # an older snapshot does not zero a key a newer delta set
    view.apply(batch("p/0", 1, {B: load(4)}, snapshot=True))
    assert reqs(ds, A) == 1
    assert reqs(ds, B) == 4


def test_a_lost_batch_is_repaired_by_the_next_snapshot() -> None:
    ds, view, _, _ = setup()
    view.apply(batch("p/0", 1, {A: load(2), B: load(1)}))
    # seq 2 (A -> 0, B -> 3) is lost
    assert view.apply(batch("p/0", 3, {}, snapshot=True)) == APPLIED
    assert view.gaps == 1
    assert reqs(ds, A) == 0 and reqs(ds, B) == 0  # the snapshot lists nothing: all zero
    view.apply(batch("p/0", 4, {B: load(3)}, snapshot=True))
    assert reqs(ds, B) == 3


def test_expiry_subtracts_exactly_the_silent_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    ds, view, clock, _ = setup(expiry=2.0)
    ep = ds.get(A)
    assert ep is not None
    ep.inflight.requests = 1
    view.apply(batch("dead/0", 1, {A: load(5, 500, 2)}))
    clock.t += 1.5
    view.apply(batch("alive/0", 1, {A: load(2)}))
    assert ep.inflight.requests == 8
    clock.t += 1.0  # dead: 2.5 s silent; alive: 1.0 s
    assert view.expire() == ["dead/0"]
    assert ep.inflight.requests == 3 and ep.inflight.tokens == 0
    assert ep.inflight.pending_requests == 0
    assert list(view.origins) == ["alive/0"]


def test_restart_with_a_new_epoch_replaces_the_old_contribution() -> None:
    ds, view, _, _ = setup()
    view.apply(batch("p/0", 41, {A: load(5)}, epoch=1))
    view.apply(batch("p/0", 1, {B: load(1)}, epoch=2))  # restarted: starts over at seq 1
    assert reqs(ds, A) == 0 and reqs(ds, B) == 1
    # leftovers of the old incarnation are ignored
    assert view.apply(batch("p/0", 42, {A: load(9)}, epoch=1)) == STALE_EPOCH
    assert reqs(ds, A) == 0


def test_goodbye_drops_now_and_own_batches_are_ignored() -> None:
    ds, view, _, _ = setup()
    view.apply(batch("p/0", 1, {A: load(5)}))
    assert view.apply(batch("p/0", 2, goodbye=True)) == GOODBYE
    assert reqs(ds, A) == 0 and not view.origins
    assert view.apply(batch("me/0", 1, {A: load(5)})) == SELF
    assert reqs(ds, A) == 0


def test_endpoint_added_late_or_replaced_gets_the_peer_load() -> None:
    ds, view, _, _ = setup()
    view.apply(batch("p/0", 1, {"127.0.0.9:8000": load(2), A: load(1)}))
    late = ds.upsert_endpoint("test", Endpoint("127.0.0.9", 8000))
    assert late.inflight.requests == 2
    ds.remove_endpoint(A)
    again = ds.upsert_endpoint("test", Endpoint("127.0.0.1", 8000))  # a new object
    assert again.inflight.requests == 1
    view.apply(batch("p/0", 2, {A: load(0)}, snapshot=True))
    assert again.inflight.requests == 0 and late.inflight.requests == 0


def test_prefix_inserts_and_queue_depths() -> None:
    _, view, _, index = setup()
    view.apply(batch("p/0", 1, prefix={A: [11, 12, 13], "10.9.9.9:1": [5]}, queues={(0, "x"): 3}))
    assert index.match([11, 12, 13]) == {A: 3}
    view.apply(batch("q/0", 1, queues={(0, "x"): 2, (-1, "y"): 1}))
    assert view.queue_totals() == {(0, "x"): (5, 0), (-1, "y"): (1, 0)}
    view.apply(batch("p/0", 2, snapshot=True))  # p's queues are empty now
    assert view.queue_totals() == {(0, "x"): (2, 0), (-1, "y"): (1, 0)}


def test_a_peers_kv_in_transit_is_not_counted_as_landed() -> None:
    """P/D across replicas: replica p sent a prompt's KV to A (prefill elsewhere); until it
    lands, A's blocks from the first one it lacked are not counted here either."""
    ds, view, clock, index = setup()
    ep = ds.get(A)
    assert ep is not None
    hashes = [11, 12, 13, 14]
    index.insert(ep, hashes)  # the peer's prefix insert for A
    assert index.landed_blocks(A, hashes, 4) == 4
    view.apply(batch("p/0", 1, transit={(A, 12): 1}))
    assert index.landed_blocks(A, hashes, 4) == 1
    view.apply(batch("p/0", 1, transit={(A, 12): 1}))  # a duplicate: still one transfer
    view.apply(batch("p/0", 3, transit={(A, 12): 2}))
    view.apply(batch("p/0", 2, transit={(A, 12): 0}))  # reordered, older: ignored
    assert index.landed_blocks(A, hashes, 4) == 1
    view.apply(batch("p/0", 4, snapshot=True))  # landed (a lost delta, repaired)
    assert index.landed_blocks(A, hashes, 4) == 4
    view.apply(batch("p/0", 5, transit={(A, 13): 1}))
    view.apply(batch("q/0", 1, transit={(A, 12): 1}))
    assert index.landed_blocks(A, hashes, 4) == 1
    view.apply(batch("q/0", 2, goodbye=True))
    assert index.landed_blocks(A, hashes, 4) == 2
    clock.t += 10
    view.expire()  # the silent peer's transfers go with it
    assert index.landed_blocks(A, hashes, 4) == 4


def test_this_instances_transfers_reach_a_peer_through_the_ledger() -> None:
    ds, view, _, peer_index = setup()
    index, ledger = PrefixIndex(), LocalLedger()
    index.on_transit = ledger.set_transit
    ep = ds.get(A)
    assert ep is not None
    hashes = [21, 22, 23]
    index.insert(ep, hashes[:1])
    first = index.begin_transfer(ep, hashes)
    assert first == 22 and ledger.dirty

    def push(seq: int) -> None:
        b = batch("p/0", seq)
        SyncNode._add_transit(b, ledger.take_transit())
        view.apply(b)

    push(1)
    peer_index.insert(ep, hashes)
    assert peer_index.landed_blocks(A, hashes, 3) == 1
    index.end_transfer(A, first)
    index.end_transfer(A, first)  # a second end of the same transfer changes nothing
    push(2)
    assert peer_index.landed_blocks(A, hashes, 3) == 3 and not ledger.transit


def test_a_peers_prefill_charges_fill_the_fluid_queue_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each replica's latency model sees the prefill work every replica queued on a pod;
    a duplicated or late (reordered) batch does not charge it twice."""
    now = [50.0]
    monkeypatch.setattr(model_clock, "now", lambda: now[0])
    ds = Datastore()
    ds.upsert_endpoint("test", Endpoint("127.0.0.1", 8000))
    model = LatencyModel()
    view = PeerView(ds, PrefixIndex(), "me/0", latency=model)
    ep = ds.get(A)
    assert ep is not None
    rate = model.prefill_tokens_per_s(ep, now[0])

    def backlog() -> float:
        return model.backlog_tokens(ep, now[0], rate)

    first = batch("p/0", 2, charges={A: 3000})
    assert view.apply(first) == APPLIED and backlog() == 3000
    view.apply(first)  # duplicated
    view.apply(batch("p/0", 1, charges={A: 3000}))  # older, arriving late
    assert backlog() == 3000 and view.prefill_charges == 1
    now[0] += 1000 / rate  # a second of this pod's prefill speed, in tokens: 1000 drained
    assert backlog() == pytest.approx(2000)
    view.apply(batch("q/0", 1, charges={A: 500, "127.0.0.9:8000": 700}))  # another origin
    assert backlog() == pytest.approx(2500) and view.prefill_charges == 2
    assert ep.queue.pick_rate > 0  # peers' picks count in the pod's recent pick rate


def test_a_peers_precise_speculation_is_held_here_and_not_echoed() -> None:
    """With the precise index, what a replica's pick sent to a pod counts as held on the
    other replicas before the pod's KV events come; a speculation learnt from a peer is not
    sent on again."""
    ds = Datastore()
    ds.upsert_endpoint("test", Endpoint("127.0.0.1", 8000))
    mine, theirs = PreciseIndex(4), PreciseIndex(4)
    sent: list[tuple[str, list[int]]] = []
    mine.on_speculate = lambda key, hashes: sent.append((key, hashes))
    theirs.on_speculate = mine.on_speculate  # would show up in `sent` if echoed
    view = PeerView(ds, PrefixIndex(), "me/0", precise=theirs)
    hashes = mine.hash_ids(list(range(20)))  # 5 blocks
    mine.speculate(A, hashes, 2)
    assert sent == [(A, hashes)]  # the whole prompt: its head is recently used there too
    assert theirs.match(hashes) == {}
    b = batch("p/0", 1)
    b.precise.add(endpoint=A, hashes=sent[0][1])
    view.apply(b)
    assert theirs.match(hashes) == {A: 5}
    assert len(sent) == 1


def director_with_sync(pool: list[Endpoint]) -> tuple[Director, LocalLedger]:
    """A director on `pool` (default config) with the replica-sync hook and its ledger."""
    ds = Datastore()
    for e in pool:
        ds.upsert_endpoint("test", e)
    rc = build_request_control(None)
    ledger = LocalLedger()
    rc.hooks.append(ReplicaSync(ledger, services=rc.scheduler.services))
    return Director(ds, rc.scheduler, hooks=rc.hooks, rng=random.Random(3)), ledger


def test_the_hook_shares_the_prefill_work_local_accounting_queues() -> None:
    """Through the director: the ledger's charges are the uncached tokens the local fluid
    model was charged, on the prefilling endpoint."""
    d, ledger = director_with_sync([Endpoint(f"127.0.0.{i}", 8000) for i in (1, 2)])
    sent: dict[str, int] = {}
    for i in range(6):
        prompt = (f"system {i % 2} " * 300 + str(i)).encode()
        dec = d.admit(InferenceRequest(f"r{i}", "m", prompt=prompt, prompt_tokens=len(prompt) // 4))
        key = dec.result.target.key
        sent[key] = sent.get(key, 0) + dec.result.uncached_tokens
    charges = dict(ledger.take_prefill_charges())
    assert charges == {k: v for k, v in sent.items() if v} and sum(charges.values()) > 0
    assert ledger.take_prefill_charges() == []


def test_prefix_dump_rebuilds_the_lru_order() -> None:
    ds, view, _, index = setup()
    ep = ds.get(A)
    assert ep is not None
    src = PrefixIndex()
    for i in range(5):
        src.insert(ep, [100 * i + 1, 100 * i + 2])
    src.insert(ep, [1, 2])  # touched again: most recent
    [(key, newest_first)] = list(src.export())
    # chunks of 3, oldest chunk first (what SyncNode.initial_batches sends)
    chunks = [newest_first[i : i + 3] for i in range(0, len(newest_first), 3)]
    for seq, chunk in enumerate(reversed(chunks), 1):
        view.apply(batch("p/0", seq, prefix={key: chunk}))
    [(_, copied)] = list(index.export())
    assert copied == newest_first


def test_ledger_matches_local_accounting_through_the_director() -> None:
    """The replica-sync hook charges exactly what in-flight accounting charges."""
    pool = [Endpoint(f"127.0.0.{i}", 8000) for i in (1, 2, 3)]
    pool.append(Endpoint("127.0.0.4", 8000, role="prefill"))
    d, ledger = director_with_sync(pool)
    rng = random.Random(5)
    live = []
    for i in range(200):
        prompt = (f"system {i % 4} " * 300 + str(i)).encode()
        req = InferenceRequest(f"r{i}", "m", prompt=prompt, prompt_tokens=len(prompt) // 4)
        live.append(d.admit(req))
        for dec in list(live):
            r = rng.random()
            if r < 0.2:
                d.first_byte(dec)
            elif r < 0.35:
                d.release(dec)
                live.remove(dec)
        for e in pool:
            assert load_of(ledger.loads.get(e.key, InFlight())) == load_of(e.inflight)
    _, prefix, _ = ledger.take_delta()
    assert prefix and all(hashes for _, hashes in prefix)
    for dec in live:
        d.release(dec)
    assert all(load_of(e.inflight) == ZERO_LOAD for e in pool)
    loads, _, _ = ledger.take_delta()
    assert all(v == ZERO_LOAD for _, v in loads) and not ledger.loads


# ---- property: whatever the network does, the final snapshot converges ----------------------
@st.composite
def histories(draw: st.DrawFn) -> tuple[list[dict[str, Load]], list[int]]:
    """An origin's successive states, and the order its batches arrive in (with losses,
    duplicates and reordering)."""
    keys = [A, B, "127.0.0.9:8000"]
    n = draw(st.integers(1, 12))
    states = [
        {k: load(draw(st.integers(0, 4)), draw(st.integers(0, 50))) for k in keys} for _ in range(n)
    ]
    arrivals = draw(st.lists(st.integers(0, n - 1), max_size=3 * n))
    return states, arrivals


@settings(max_examples=300, deadline=None)
@given(histories(), st.booleans())
def test_any_delivery_order_converges_after_a_snapshot(
    h: tuple[list[dict[str, Load]], list[int]], deltas_only_changed: bool
) -> None:
    states, arrivals = h
    ds, view, _, _ = setup()
    local = ds.get(A)
    assert local is not None
    local.inflight.requests = 1

    def delta(i: int) -> pb.SyncBatch:
        prev = states[i - 1] if i else {}
        changed = {
            k: v for k, v in states[i].items() if not deltas_only_changed or prev.get(k) != v
        }
        return batch("p/0", i + 1, changed)

    for i in arrivals:
        view.apply(delta(i))
        for k in (A, B):  # never below the local count, never negative
            ep = ds.get(k)
            assert ep is not None and ep.inflight.requests >= (1 if k == A else 0)
    last = len(states)
    final = {k: v for k, v in states[-1].items() if v != ZERO_LOAD}
    view.apply(batch("p/0", last + 1, final, snapshot=True))
    for k in (A, B):
        ep = ds.get(k)
        assert ep is not None
        expect = states[-1][k][0] + (1 if k == A else 0)
        assert ep.inflight.requests == expect
    assert view.peer_load("127.0.0.9:8000") == states[-1]["127.0.0.9:8000"]
