"""Sync nodes over real gRPC (loopback TCP and unix sockets, in one process): state reaches
peers, a late joiner converges from the initial snapshot and prefix dump, goodbye and
expiry drop a peer, a node recognises itself, and worker siblings get remote state
relayed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint
from epp.scheduling.latency_model import LatencyModel
from epp.scheduling.prefix_index import PrefixIndex
from epp.sync.ledger import LocalLedger
from epp.sync.merge import PeerView
from epp.sync.node import SyncNode

KEYS = ["127.0.0.1:8000", "127.0.0.2:8000"]


class Instance:
    def __init__(self, origin: str, expiry: float = 1.0) -> None:
        self.ds = Datastore()
        for k in KEYS:
            host, port = k.split(":")
            self.ds.upsert_endpoint("test", Endpoint(host, int(port)))
        self.index = PrefixIndex()
        self.ledger = LocalLedger()
        self.latency = LatencyModel()
        self.view = PeerView(self.ds, self.index, origin, latency=self.latency, expiry_s=expiry)
        self.node = SyncNode(
            self.ledger,
            self.view,
            origin=origin,
            prefix_index=self.index,
            flush_interval=0.002,
            snapshot_interval=0.1,
        )
        self.address = ""

    async def start(self, listen: str) -> None:
        await self.node.start([listen])
        port = self.node.ports[listen]
        self.address = listen if listen.startswith("unix:") else f"127.0.0.1:{port}"

    def ep(self, i: int) -> Endpoint:
        ep = self.ds.get(KEYS[i])
        assert ep is not None
        return ep

    def charge(self, i: int, n: int = 1, hashes: list[int] | None = None) -> None:
        ep = self.ep(i)
        self.ledger.counters(ep).requests += n
        ep.inflight.requests += n  # what in-flight accounting does locally
        if hashes:
            self.index.insert(ep, hashes)
            self.ledger.add_prefix(ep, hashes)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError("timed out")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


@pytest.fixture
async def instances() -> AsyncIterator[list[Instance]]:
    made: list[Instance] = []
    yield made
    for inst in made:
        await inst.node.stop(0.2)


async def pair(instances: list[Instance], both_ways: bool = True) -> tuple[Instance, Instance]:
    """Two instances over loopback TCP; `a` pushes to `b` (and `b` to `a`)."""
    a, b = Instance("a/0"), Instance("b/0")
    instances += [a, b]
    await a.start("127.0.0.1:0")
    await b.start("127.0.0.1:0")
    a.node.set_peers(remote=[b.address])
    if both_ways:
        b.node.set_peers(remote=[a.address])
    return a, b


async def test_state_reaches_a_peer_and_goodbye_drops_it(instances: list[Instance]) -> None:
    a, b = await pair(instances)
    a.charge(0, 2, hashes=[1, 2, 3])
    b.charge(1, 1)
    took = await until(lambda: b.ep(0).inflight.requests == 2 and a.ep(1).inflight.requests == 1)
    assert took < 1.0
    await until(lambda: b.index.match([1, 2, 3]) == {KEYS[0]: 3})
    a.ledger.counters(a.ep(0)).requests -= 2
    a.ep(0).inflight.requests -= 2
    await until(lambda: b.ep(0).inflight.requests == 0)
    a.charge(0, 4)
    await until(lambda: b.ep(0).inflight.requests == 4)
    await a.node.stop(0.5)
    instances.remove(a)
    await until(lambda: b.ep(0).inflight.requests == 0 and not b.view.origins, timeout=0.5)


async def test_prefill_charges_reach_a_peers_latency_model(instances: list[Instance]) -> None:
    a, b = await pair(instances, both_ways=False)
    ep = b.ep(1)
    # Charges are events: only those made while the stream is up reach the peer.
    await until(lambda: "a/0" in b.view.origins)
    assert b.latency.queued_prefill_tokens(ep) == 0
    a.ledger.add_prefill_charge(a.ep(1), 40_000)
    await until(lambda: b.latency.queued_prefill_tokens(ep) > 0)
    assert b.latency.queued_prefill_tokens(ep) <= 40_000
    assert b.latency.queued_prefill_tokens(b.ep(0)) == 0


async def test_kv_in_transit_reaches_a_peer_and_a_late_joiner(instances: list[Instance]) -> None:
    """P/D: a's remote prefill for decode pod 0 is in transit on b too (b got a's insert
    for pod 0 at once) until a sees it land; a joiner gets it in its initial snapshot."""
    a, b = await pair(instances, both_ways=False)
    a.index.on_transit = a.ledger.set_transit
    hashes = [7, 8, 9]
    first = a.index.begin_transfer(a.ep(0), hashes)
    a.charge(0, 1, hashes=hashes)
    await until(lambda: b.index.match(hashes) == {KEYS[0]: 3})
    await until(lambda: b.index.landed_blocks(KEYS[0], hashes, 3) == 0)
    c = Instance("c/0")
    instances.append(c)
    await c.start("127.0.0.1:0")
    a.node.set_peers(remote=[b.address, c.address])
    await until(lambda: c.index.match(hashes) == {KEYS[0]: 3})
    await until(lambda: c.index.landed_blocks(KEYS[0], hashes, 3) == 0)
    assert first is not None
    a.index.end_transfer(KEYS[0], first)
    await until(lambda: b.index.landed_blocks(KEYS[0], hashes, 3) == 3)
    await until(lambda: c.index.landed_blocks(KEYS[0], hashes, 3) == 3)


async def test_a_late_joiner_converges_from_snapshot_and_dump(instances: list[Instance]) -> None:
    a = Instance("a/0")
    instances.append(a)
    await a.start("127.0.0.1:0")
    a.charge(0, 3, hashes=list(range(100, 20_100)))  # more than one dump chunk
    b = Instance("b/0")
    instances.append(b)
    await b.start("127.0.0.1:0")
    a.node.set_peers(remote=[b.address])
    await until(lambda: b.ep(0).inflight.requests == 3)
    await until(lambda: b.index.blocks_held(KEYS[0]) == 20_000)
    assert list(b.index.export()) == list(a.index.export())


async def test_a_crashed_peer_expires(instances: list[Instance]) -> None:
    a, b = Instance("a/0"), Instance("b/0", expiry=0.4)
    instances.append(b)
    await a.start("127.0.0.1:0")
    await b.start("127.0.0.1:0")
    a.node.set_peers(remote=[b.address])
    a.charge(0, 5)
    await until(lambda: b.ep(0).inflight.requests == 5)
    # crash: no goodbye, streams cut
    assert a.node._ticker is not None
    a.node._ticker.cancel()
    for link in a.node.remote.values():
        link.closed = True
        link.task.cancel()
    assert a.node.server is not None
    await a.node.server.stop(0)
    took = await until(lambda: b.ep(0).inflight.requests == 0, timeout=3.0)
    assert 0.2 < took < 1.5
    assert b.view.expired == 1


async def test_a_node_recognises_itself(instances: list[Instance]) -> None:
    a = Instance("h/0")
    instances.append(a)
    await a.start("127.0.0.1:0")
    a.node.set_peers(remote=[a.address])
    link = a.node.remote[a.address]
    await until(lambda: link.is_self)
    assert not a.view.origins


async def test_workers_get_remote_state_relayed(instances: list[Instance], tmp_path: Path) -> None:
    w0, w1, r = Instance("h/0"), Instance("h/1"), Instance("r/0")
    instances += [w0, w1, r]
    await w0.node.start([f"unix:{tmp_path}/w0.sock", "127.0.0.1:0"])
    w0_tcp = next(p for a, p in w0.node.ports.items() if not a.startswith("unix:"))
    await w1.start(f"unix:{tmp_path}/w1.sock")
    await r.start("127.0.0.1:0")
    w0.node.set_peers(remote=[], local=[f"unix:{tmp_path}/w1.sock"])
    w1.node.set_peers(remote=[], local=[f"unix:{tmp_path}/w0.sock"])
    r.node.set_peers(remote=[f"127.0.0.1:{w0_tcp}"])  # the remote reaches one worker only
    r.charge(1, 2, hashes=[7, 8])
    w1.charge(0, 1)
    await until(lambda: w1.ep(1).inflight.requests == 2)  # relayed by w0
    await until(lambda: w1.index.match([7, 8]) == {KEYS[1]: 2})
    await until(lambda: w0.ep(0).inflight.requests == 1)
    assert w0.node.stats.relayed > 0
    assert w1.node.stats.relayed == 0  # relayed copies are not relayed again
    assert set(w1.view.origins) == {"h/0", "r/0"}


async def test_queue_depths_are_shared(instances: list[Instance]) -> None:
    a, b = Instance("a/0"), Instance("b/0")
    instances += [a, b]
    await a.start("127.0.0.1:0")
    await b.start("127.0.0.1:0")
    a.node.set_peers(remote=[b.address])
    sizes = {(0, "team-a"): 3, (-1, "batch"): 1}
    a.node.queue_source = lambda: sizes
    await until(lambda: b.view.queue_totals() == {(0, "team-a"): (3, 0), (-1, "batch"): (1, 0)})
    sizes = {(0, "team-a"): 1}
    await until(lambda: b.view.queue_totals() == {(0, "team-a"): (1, 0)})


def test_endpointslice_addresses() -> None:
    from epp.sync.membership import slice_addresses

    obj = {
        "ports": [{"name": "grpc-ext-proc", "port": 9002}, {"name": "sync", "port": 9004}],
        "endpoints": [
            {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},  # starting: a peer
            {"addresses": ["10.0.0.3"], "conditions": {"terminating": True}},
            {"addresses": ["fd00::4"]},
        ],
    }
    own = frozenset({"10.0.0.1"})
    assert slice_addresses(obj, "sync", own) == ["10.0.0.2:9004", "[fd00::4]:9004"]
    assert slice_addresses(obj, "missing", own) == []
    unnamed = {"ports": [{"port": 7000}], "endpoints": [{"addresses": ["10.0.0.9"]}]}
    assert slice_addresses(unnamed, "sync", own) == ["10.0.0.9:7000"]


def test_epp_serve_shares_its_transfers_in_flight() -> None:
    """`epp serve` with sync on: the prefix index's P/D transfers reach the sync ledger."""
    from prometheus_client import CollectorRegistry

    from epp.cli import make_parser
    from epp.replicas import ReplicaSyncSetup
    from epp.requestcontrol.config import build_request_control

    args = make_parser("serve").parse_args(["--peers", "127.0.0.1:9"])
    control = build_request_control()
    ds = Datastore()
    ep = Endpoint("127.0.0.1", 8000)
    ds.upsert_endpoint("test", ep)
    setup = ReplicaSyncSetup(args, ds, control, CollectorRegistry())
    index = control.scheduler.services.prefix_index
    first = index.begin_transfer(ep, [5, 6])
    assert setup.ledger.transit == {(ep.key, 5): 1} and first == 5
    index.end_transfer(ep.key, first)
    assert setup.ledger.transit == {}
