"""The sync node: pushes this instance's ledger to its peers and merges what they push.

Transport: gRPC `epp.sync.v1.StateSync/Push` (protos/epp/sync/v1/sync.proto), one client
stream per peer address, over TCP between replicas and over unix sockets between the
worker processes of one `epp serve --workers N`. Each stream starts with a snapshot of
this instance's load and a dump of its prefix index (so a restarted peer converges at
once), then carries delta batches (flushed `flush_interval` after the first change) and a
snapshot every `snapshot_interval` (the heartbeat that also repairs anything lost).

Batches from a remote origin that arrive over TCP are relayed once to the local sibling
workers (a TCP connection lands on one worker of a host; its siblings need the state too).
A peer that is this instance's own group (its own pod, reached through the Service) is
detected by the receiver, which refuses the stream; the dialer then stops dialing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from epp.scheduling.prefix_index import PrefixIndex
from epp.sync.ledger import Load, LocalLedger, QueueKey, TransitKey
from epp.sync.merge import APPLIED, PeerView
from epp.sync.v1 import sync_pb2 as pb
from epp.sync.v1 import sync_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

PUSH_METHOD = "/epp.sync.v1.StateSync/Push"
SELF_DETAIL = "epp-sync: same group"
DUMP_CHUNK = 8192  # prefix hashes per dump batch (64 KiB)
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def group_of(origin: str) -> str:
    return origin.rpartition("/")[0] or origin


@dataclass(slots=True)
class SyncStats:
    sent: dict[str, int] = field(default_factory=dict)  # batches by kind
    received: dict[str, int] = field(default_factory=dict)  # batches by outcome
    bytes_sent: int = 0
    relayed: int = 0
    link_errors: int = 0
    link_resets: int = 0  # a peer too slow to take our batches: dropped and resynced

    def count(self, table: dict[str, int], kind: str, n: int = 1) -> None:
        table[kind] = table.get(kind, 0) + n


def _identity(b: bytes) -> bytes:
    return b


class _Link:
    """One outgoing stream to one peer address, reconnected forever until closed."""

    def __init__(self, node: SyncNode, address: str, local: bool) -> None:
        self.node = node
        self.address = address
        self.local = local
        self.queue: asyncio.Queue[bytes | None] | None = None
        self.is_self = False
        self.closed = False
        self.connected_at = 0.0
        self.wake = asyncio.Event()  # a peer just dialed us: it is up, retry now
        self.task = asyncio.get_running_loop().create_task(self._run())

    def send(self, data: bytes) -> None:
        q = self.queue
        if q is None:
            return  # not connected: the next stream starts with a snapshot anyway
        try:
            q.put_nowait(data)
        except asyncio.QueueFull:
            # The peer does not keep up: drop the backlog and start over with a snapshot.
            self.node.stats.link_resets += 1
            self.queue = None
            self.task.cancel()
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def close(self, timeout: float) -> None:
        self.closed = True
        q = self.queue
        if q is not None:
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.task), timeout)
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task

    async def _run(self) -> None:
        backoff = 0.05
        node = self.node
        while not (self.is_self or self.closed):
            queue: asyncio.Queue[bytes | None] = asyncio.Queue(node.max_queue)
            started = time.monotonic()
            channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
            try:
                push = channel.stream_unary(
                    PUSH_METHOD,
                    request_serializer=_identity,
                    response_deserializer=pb.PushAck.FromString,
                )
                self.queue = queue
                await push(self._stream(queue))
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION and SELF_DETAIL in (
                    e.details() or ""
                ):
                    self.is_self = True
                    log.info(
                        "sync peer %s is this instance's own group; not dialing it", self.address
                    )
                    return
                node.stats.link_errors += 1
                log.debug("sync link %s: %s", self.address, e.code())
            finally:
                if self.queue is queue:
                    self.queue = None
                await channel.close(None)
            if self.closed:
                return
            if time.monotonic() - started > 2.0:
                backoff = 0.05
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), backoff)
            backoff = min(backoff * 2, 1.0)

    async def _stream(self, queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
        node = self.node
        for data in node.initial_batches():
            yield data
        self.connected_at = time.monotonic()
        while True:
            item = await queue.get()
            if item is None:
                return
            yield item


class _Servicer(pb_grpc.StateSyncServicer):
    def __init__(self, node: SyncNode) -> None:
        self.node = node

    async def Push(
        self,
        request_iterator: AsyncIterator[pb.SyncBatch],
        context: grpc.aio.ServicerContext[pb.SyncBatch, pb.PushAck],
    ) -> pb.PushAck:
        node = self.node
        over_tcp = not context.peer().startswith("unix:")
        n = 0
        async for b in request_iterator:
            if n == 0 and (
                b.origin == node.origin or (over_tcp and group_of(b.origin) == node.group)
            ):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, SELF_DETAIL)
            if n == 0:
                node.kick()
            n += 1
            node.receive(b, relay=over_tcp and b.hops == 0)
        return pb.PushAck(receiver=node.origin, batches=n)


class SyncNode:
    """Sharing of this instance's ledger with its peers, and merging of theirs."""

    def __init__(
        self,
        ledger: LocalLedger,
        view: PeerView,
        *,
        origin: str,
        epoch: int | None = None,
        prefix_index: PrefixIndex | None = None,
        flush_interval: float = 0.005,
        snapshot_interval: float = 0.5,
        max_queue: int = 2048,
    ) -> None:
        self.ledger = ledger
        self.view = view
        self.origin = origin
        self.group = group_of(origin)
        self.epoch = epoch if epoch is not None else time.time_ns()
        self.prefix_index = prefix_index
        self.flush_interval = flush_interval
        self.snapshot_interval = snapshot_interval
        self.max_queue = max_queue
        self.seq = 0
        self.stats = SyncStats()
        self.closing = False
        self.remote: dict[str, _Link] = {}
        self.local: dict[str, _Link] = {}
        self.server: grpc.aio.Server | None = None
        self.ports: dict[str, int] = {}
        self.observe_lag: Callable[[float], None] | None = None
        # This instance's flow-control queue depths, (band, flow) -> requests; sampled at
        # every batch (flow control keeps them; nothing to hook on its path).
        self.queue_source: Callable[[], Mapping[QueueKey, int] | None] | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._last_flush = 0.0  # loop time of the last delta batch
        self._ticker: asyncio.Task[None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self, listen: Iterable[str] = (), *, reuseport: bool = False) -> None:
        """Serve StateSync on each `listen` address ("host:port" or "unix:/path")."""
        addresses = list(listen)
        if addresses:
            self.server = grpc.aio.server(
                options=[
                    ("grpc.so_reuseport", 1 if reuseport else 0),
                    ("grpc.max_receive_message_length", 64 << 20),
                    ("grpc.keepalive_permit_without_calls", 1),
                    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ]
            )
            pb_grpc.add_StateSyncServicer_to_server(_Servicer(self), self.server)  # type: ignore[no-untyped-call]
            for a in addresses:
                self.ports[a] = self.server.add_insecure_port(a)
            await self.server.start()
        self.ledger.on_dirty = self._schedule_flush
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self, timeout: float = 1.0) -> None:
        """Say goodbye (peers drop this instance's contribution now), then close."""
        if self._ticker is not None:
            self._ticker.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self.ledger.on_dirty = None
        self.flush()
        self.seq += 1
        self._broadcast(
            pb.SyncBatch(
                origin=self.origin,
                epoch=self.epoch,
                seq=self.seq,
                goodbye=True,
                sent_at=time.time(),
            ),
            "goodbye",
        )
        self.closing = True
        links = [*self.remote.values(), *self.local.values()]
        await asyncio.gather(*(link.close(timeout) for link in links), return_exceptions=True)
        self.remote.clear()
        self.local.clear()
        if self.server is not None:
            await self.server.stop(0)

    def set_peers(self, remote: Iterable[str] = (), local: Iterable[str] | None = None) -> None:
        """The current peer addresses (membership changes call this again)."""
        self._reconcile(self.remote, set(remote), local=False)
        if local is not None:
            self._reconcile(self.local, set(local), local=True)

    def _reconcile(self, links: dict[str, _Link], wanted: set[str], local: bool) -> None:
        for address in [a for a in links if a not in wanted]:
            link = links.pop(address)
            asyncio.get_running_loop().create_task(link.close(0.2))
        for address in wanted - links.keys():
            links[address] = _Link(self, address, local)

    def kick(self) -> None:
        """A peer (re)connected to us: links waiting to reconnect try again at once."""
        for link in [*self.remote.values(), *self.local.values()]:
            if link.queue is None:
                link.wake.set()

    # ---- outgoing ----------------------------------------------------------------------------
    def _schedule_flush(self) -> None:
        # Rate-limited, not delayed: after a quiet spell a change goes out on the next loop
        # turn; under load, batches go at most every flush_interval.
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._last_flush + self.flush_interval - loop.time())
            self._flush_handle = loop.call_later(delay, self.flush)

    def flush(self) -> None:
        """Send what changed since the last batch (nothing if nothing did)."""
        self._sample_queues()
        if self._flush_handle is not None:  # this call, or a pending one it makes useless
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self.ledger.dirty:
            return
        self._last_flush = asyncio.get_running_loop().time()
        loads, prefix, queues = self.ledger.take_delta()
        self.seq += 1
        b = self._batch(loads, prefix, queues, snapshot=False)
        self._add_transit(b, self.ledger.take_transit())
        self._add_events(b)
        self._broadcast(b, "delta")

    def snapshot(self) -> None:
        """Every non-zero entry (plus anything pending): the heartbeat and the repair."""
        self._sample_queues()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        _, prefix, _ = self.ledger.take_delta()
        self.ledger.take_transit()
        loads, queues = self.ledger.snapshot()
        self.seq += 1
        b = self._batch(loads, prefix, queues, snapshot=True)
        self._add_transit(b, list(self.ledger.transit.items()))
        self._add_events(b)
        self._broadcast(b, "snapshot")

    def _sample_queues(self) -> None:
        if self.queue_source is not None:
            self.ledger.sync_queues(self.queue_source() or {})

    def _batch(
        self,
        loads: list[tuple[str, Load]],
        prefix: list[tuple[str, list[int]]],
        queues: list[tuple[QueueKey, tuple[int, int]]],
        *,
        snapshot: bool,
    ) -> pb.SyncBatch:
        b = pb.SyncBatch(
            origin=self.origin,
            epoch=self.epoch,
            seq=self.seq,
            snapshot=snapshot,
            sent_at=time.time(),
        )
        add_load = b.inflight.add
        for key, v in loads:
            add_load(
                endpoint=key,
                requests=v[0],
                tokens=v[1],
                prefill_requests=v[2],
                prefill_tokens=v[3],
                pending_requests=v[4],
                pending_prefill_tokens=v[5],
            )
        for key, hashes in prefix:
            b.prefix.add(endpoint=key, hashes=hashes)
        for (band, flow), (n, size) in queues:
            b.queues.add(band=band, flow=flow, requests=n, bytes=size)
        return b

    @staticmethod
    def _add_transit(b: pb.SyncBatch, transit: list[tuple[TransitKey, int]]) -> None:
        for (key, first), n in transit:
            b.transit.add(endpoint=key, first=first, requests=n)

    def _add_events(self, b: pb.SyncBatch) -> None:
        """The event-like parts: prefill charges and precise speculations."""
        for key, tokens in self.ledger.take_prefill_charges():
            b.prefill_charges.add(endpoint=key, tokens=tokens)
        for key, hashes in self.ledger.take_precise():
            b.precise.add(endpoint=key, hashes=hashes)

    def _broadcast(self, b: pb.SyncBatch, kind: str) -> None:
        data = b.SerializeToString()
        links = [*self.remote.values(), *self.local.values()]
        for link in links:
            link.send(data)
        self.stats.count(self.stats.sent, kind)
        self.stats.bytes_sent += len(data) * len(links)

    def initial_batches(self) -> Iterator[bytes]:
        """A new stream: a snapshot at the current seq, then the prefix index dump."""
        self.flush()
        loads, queues = self.ledger.snapshot()
        snap = self._batch(loads, [], queues, snapshot=True)
        self._add_transit(snap, list(self.ledger.transit.items()))
        self.stats.count(self.stats.sent, "initial")
        yield snap.SerializeToString()
        if self.prefix_index is None:
            return
        for key, newest_first in self.prefix_index.export():
            # Oldest chunk first, so that re-inserting rebuilds the same LRU order.
            starts = range(0, len(newest_first), DUMP_CHUNK)
            for start in reversed(starts):
                dump = pb.SyncBatch(origin=self.origin, epoch=self.epoch, seq=self.seq)
                dump.prefix.add(endpoint=key, hashes=newest_first[start : start + DUMP_CHUNK])
                self.stats.count(self.stats.sent, "dump")
                yield dump.SerializeToString()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.snapshot_interval)
            try:
                self.snapshot()
                self.view.expire()
            except Exception:  # never let the heartbeat die
                log.exception("sync heartbeat failed")

    # ---- incoming ----------------------------------------------------------------------------
    def receive(self, b: pb.SyncBatch, *, relay: bool = False) -> str:
        outcome = self.view.apply(b)
        self.stats.count(self.stats.received, outcome)
        if self.observe_lag is not None and outcome == APPLIED and b.sent_at:
            self.observe_lag(self.view.origins[b.origin].lag_s)
        if relay and outcome == APPLIED and self.local:
            b.hops = 1
            data = b.SerializeToString()
            for link in self.local.values():
                link.send(data)
            self.stats.relayed += 1
        return outcome

    def describe(self) -> dict[str, Any]:
        """State for /debug/sync and tests."""
        now = time.monotonic()
        return {
            "origin": self.origin,
            "pid": os.getpid(),
            "epoch": self.epoch,
            "seq": self.seq,
            "peers": {
                o: {
                    "epoch": st.epoch,
                    "seq": st.max_seq,
                    "staleness_s": round(now - st.last_seen, 4),
                    "lag_s": round(st.lag_s, 4),
                    "batches": st.batches,
                    "gaps": st.gaps,
                    "requests": sum(v[0] for _, v in st.loads.values()),
                }
                for o, st in self.view.origins.items()
            },
            "links": {
                a: {"local": link.local, "connected": link.queue is not None, "self": link.is_self}
                for a, link in [*self.remote.items(), *self.local.items()]
            },
            "stats": {
                "sent": dict(self.stats.sent),
                "received": dict(self.stats.received),
                "bytes_sent": self.stats.bytes_sent,
                "relayed": self.stats.relayed,
                "link_errors": self.stats.link_errors,
                "link_resets": self.stats.link_resets,
                "expired": self.view.expired,
            },
        }
