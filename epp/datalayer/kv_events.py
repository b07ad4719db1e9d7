"""Optional subscriber to vLLM KV-cache events over ZMQ (vLLM `--kv-events-config`).

Wire format (vLLM `--kv-events-config`, publisher = ZMQ PUB):
    frames  [topic, seq (8-byte big-endian), payload (msgpack)]
    topic   `kv@<ip>:<port>@<model>` or `kv@<ip>@<model>` (llm-d's; any other topic is
            allowed, see "keys" below)
    payload [ts, events, dp_rank?]
    events  ["BlockStored", block_hashes, parent_hash|nil, token_ids, block_size, lora_id?,
             medium?, lora_name?, extra_keys?, group_idx?, kv_cache_spec_kind?, ...]
            | ["BlockRemoved", block_hashes, medium?, group_idx?] | ["AllBlocksCleared"]
            Newer vLLM (2026, vllm#42892) sends each event as a map with the same field
            names and the tag under "type" ({"type": "BlockStored", "block_hashes": ...});
            both encodings are decoded.
Block hashes are integers (older vLLM) or bytes (newer); they are passed through unchanged.

Two ways to receive:
- connect: one SUB socket per model server, connected to its publisher (e.g. tcp://ip:5557);
- bind: one SUB socket bound on `bind=` that the publishers connect to (llm-d style).

Keys (the `endpoint_key` given to `on_event`): a key configured for a connection wins;
otherwise the `ip:port` from a `kv@ip:port@model` topic; otherwise (connect mode) the
publisher's address. Messages on a bound socket without a parsable topic are dropped.

The subscriber only decodes and forwards; the scheduling layer's prefix index consumes the
events. Sequence gaps (lost messages) and publisher restarts are counted and reported to the
optional `on_gap(endpoint_key, missed)` callback (missed = -1 for a restart), so the index
can distrust that endpoint's state; `on_stream(endpoint_key, seq)` is called for the first
batch seen from a publisher and after its restarts (seq 0 = the EPP saw the stream from its
start); `on_disconnect(endpoint_key)` when a connected publisher's TCP connection drops
(connect mode: its engine may be restarting, and what it sends meanwhile is lost).
With a publisher's replay address (vLLM's `replay_endpoint`, connect mode), the batches the
EPP missed, before it joined or in a gap, are asked for and applied in order first; only
what the replay cannot give counts as lost. """

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint

log = logging.getLogger(__name__)

BlockHash = int | bytes


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[BlockHash, ...]
    parent_hash: BlockHash | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    # One entry per block: what besides the token ids keyed the engine's hash (multimodal
    # inputs, LoRA name, cache salt); None entries for plain blocks.
    extra_keys: tuple[Any, ...] | None = None
    group_idx: int | None = None
    spec_kind: str | None = None  # kv_cache_spec_kind: "full_attention", "sliding_window"...

    @property
    def keyed_beyond_tokens(self) -> bool:
        return bool(self.extra_keys) and any(k for k in self.extra_keys)  # type: ignore[union-attr]


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[BlockHash, ...]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
OnEvent = Callable[[str, KVEvent], None]
OnGap = Callable[[str, int], None]
OnStream = Callable[[str, int], None]


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: tuple[KVEvent, ...]
    dp_rank: int | None = None
    skipped: int = 0  # events that were malformed or of an unknown kind


class KVEventDecodeError(ValueError):
    pass


# ---- decoding (pure) ----------------------------------------------------------------------
def _hashes(v: object) -> tuple[BlockHash, ...]:
    if not isinstance(v, tuple | list) or not all(isinstance(h, int | bytes) for h in v):
        raise KVEventDecodeError("block hashes must be a list of ints or bytes")
    return tuple(v)


def _opt(ev: tuple[Any, ...], i: int) -> Any:
    return ev[i] if len(ev) > i else None


_FIELDS = {
    "BlockStored": (
        "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
        "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind",
    ),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}  # fmt: skip


def _from_map(ev: dict[Any, Any]) -> tuple[Any, ...]:
    """A map-encoded event -> the positional layout (absent fields = nil)."""
    tag = ev.get("type")
    if isinstance(tag, bytes):
        tag = tag.decode("utf-8", "replace")
    if not isinstance(tag, str):
        raise KVEventDecodeError("map-encoded event without a string 'type'")
    names = _FIELDS.get(tag)
    if names is None:
        return (tag,)
    return (tag, *(ev.get(n) for n in names))


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _str_or_none(v: Any) -> str | None:
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return v if isinstance(v, str) else None


def decode_event(ev: object) -> KVEvent | None:
    """One tagged event (array or map) -> dataclass; None for an unknown kind. Raises if
    malformed."""
    if isinstance(ev, dict):
        ev = _from_map(ev)
    if not isinstance(ev, tuple | list) or not ev:
        raise KVEventDecodeError(f"event must be a tagged array, got {type(ev).__name__}")
    ev = tuple(ev)
    tag = ev[0]
    if isinstance(tag, bytes):
        tag = tag.decode("utf-8", "replace")
    if tag == "BlockStored":
        if len(ev) < 5:
            raise KVEventDecodeError("BlockStored needs hashes, parent, tokens, block_size")
        parent = ev[2]
        tokens = ev[3]
        if parent is not None and not isinstance(parent, int | bytes):
            raise KVEventDecodeError("BlockStored parent hash must be int, bytes or nil")
        if not isinstance(tokens, tuple | list) or not isinstance(ev[4], int):
            raise KVEventDecodeError("BlockStored token_ids / block_size have wrong types")
        extra = _opt(ev, 8)
        return BlockStored(
            block_hashes=_hashes(ev[1]),
            parent_hash=parent,
            token_ids=tuple(tokens),
            block_size=ev[4],
            lora_id=_int_or_none(_opt(ev, 5)),
            medium=_str_or_none(_opt(ev, 6)),
            lora_name=_str_or_none(_opt(ev, 7)),
            extra_keys=tuple(extra) if isinstance(extra, tuple | list) else None,
            group_idx=_int_or_none(_opt(ev, 9)),
            spec_kind=_str_or_none(_opt(ev, 10)),
        )
    if tag == "BlockRemoved":
        if len(ev) < 2:
            raise KVEventDecodeError("BlockRemoved needs block hashes")
        return BlockRemoved(_hashes(ev[1]), _str_or_none(_opt(ev, 2)), _int_or_none(_opt(ev, 3)))
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    return None


def decode_batch(payload: bytes) -> EventBatch:
    """Decode one msgpack payload `[ts, events, dp_rank?]`. Raises `KVEventDecodeError`."""
    try:
        obj = msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise KVEventDecodeError(f"not msgpack: {e}") from None
    if not isinstance(obj, tuple) or len(obj) < 2 or not isinstance(obj[1], tuple):
        raise KVEventDecodeError("payload must be [ts, events, dp_rank?]")
    ts = obj[0] if isinstance(obj[0], int | float) else 0.0
    dp_rank = obj[2] if len(obj) > 2 and isinstance(obj[2], int) else None
    events: list[KVEvent] = []
    skipped = 0
    for raw in obj[1]:
        try:
            ev = decode_event(raw)
        except KVEventDecodeError:
            ev = None
        if ev is None:
            skipped += 1
        else:
            events.append(ev)
    return EventBatch(float(ts), tuple(events), dp_rank, skipped)


def parse_topic(topic: bytes | str) -> tuple[str, str] | None:
    """`kv@<ip>:<port>@<model>` -> ("ip:port", model); `kv@<ip>@<model>` (llm-d's, no port)
    -> ("ip", model); None if the topic has another shape."""
    text = topic.decode("utf-8", "replace") if isinstance(topic, bytes) else topic
    parts = text.split("@", 2)
    if len(parts) < 2 or parts[0] != "kv" or not _host_or_hostport(parts[1]):
        return None
    return parts[1], parts[2] if len(parts) > 2 else ""


def _host_or_hostport(text: str) -> bool:
    host = text
    if text.startswith("["):  # [v6] or [v6]:port
        host = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:  # v4:port or name:port
        host = text.split(":", 1)[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return ":" in text and bool(host)
    return True


def encode_batch(events: Iterable[KVEvent], ts: float = 0.0, dp_rank: int | None = None) -> bytes:
    """The inverse of `decode_batch` (vLLM's layout), for publishers written in Python
    (the tests use it; the simulator packs its events itself)."""
    out: list[list[Any]] = []
    for ev in events:
        if isinstance(ev, BlockStored):
            item: list[Any] = [
                "BlockStored",
                list(ev.block_hashes),
                ev.parent_hash,
                list(ev.token_ids),
                ev.block_size,
            ]
            if ev.lora_id is not None or ev.medium is not None:
                item += [ev.lora_id, ev.medium]
            out.append(item)
        elif isinstance(ev, BlockRemoved):
            out.append(["BlockRemoved", list(ev.block_hashes)] + ([ev.medium] if ev.medium else []))
        else:
            out.append(["AllBlocksCleared"])
    batch: list[Any] = [ts, out] + ([dp_rank] if dp_rank is not None else [])
    data: bytes = msgpack.packb(batch, use_bin_type=True)
    return data


# ---- the subscriber -----------------------------------------------------------------------------
@dataclass(slots=True)
class _Stream:
    address: str
    key: str | None  # configured endpoint key, if any
    bind: bool
    socket: zmq.asyncio.Socket | None = None
    task: asyncio.Task[None] | None = None
    monitor: asyncio.Task[None] | None = None
    replay: str | None = None  # the publisher's replay (ROUTER) address, if it has one


class KVEventSubscriber:
    """Receives KV events from many publishers and calls `on_event(endpoint_key, event)`.

    `endpoints` is a list of ZMQ addresses (keys from topics) or a mapping
    `{endpoint_key: zmq_address}`. `follow(datastore, address_for)` instead tracks the
    datastore: every endpoint for which `address_for(ep)` returns an address is subscribed
    to while it exists. `bind` additionally binds one SUB socket publishers connect to.
    """

    def __init__(
        self,
        endpoints: Iterable[str] | Mapping[str, str] = (),
        on_event: OnEvent | None = None,
        *,
        bind: str | None = None,
        topic: str = "",
        on_gap: OnGap | None = None,
        on_stream: OnStream | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        rcvhwm: int = 100_000,
    ) -> None:
        if on_event is None:
            raise TypeError("on_event is required")
        self._on_event = on_event
        self._on_gap = on_gap
        self._on_stream = on_stream
        self._on_disconnect = on_disconnect
        self._topic = topic.encode()
        self._rcvhwm = rcvhwm
        self._streams: dict[str, _Stream] = {}  # by stream id (key or address)
        self._last_seq: dict[str, int] = {}
        self._ctx: zmq.asyncio.Context | None = None
        self._running = False
        if isinstance(endpoints, Mapping):
            for key, address in endpoints.items():
                self._streams[key] = _Stream(address, key, False)
        else:
            for address in endpoints:
                self._streams[address] = _Stream(address, None, False)
        if bind is not None:
            self._streams[f"bind:{bind}"] = _Stream(bind, None, True)
        self.batches = 0
        self.events = 0
        self.dropped = 0  # malformed frames / payloads / events, unattributable messages
        self.gaps = 0
        self.disconnects = 0
        self.replayed = 0  # batches recovered from publishers' replay sockets
        self.replay_failures = 0
        self.replay_timeout_s = 2.0
        self._replaying: dict[str, list[tuple[int, bytes]]] = {}
        self._replay_tasks: set[asyncio.Task[None]] = set()
        self.callback_errors = 0

    # ---- configuration ------------------------------------------------------------------------
    def add(self, endpoint_key: str, address: str, replay: str | None = None) -> None:
        """Subscribe to `address` and attribute its events to `endpoint_key`; `replay`: the
        publisher's replay address, asked for the batches the EPP missed."""
        cur = self._streams.get(endpoint_key)
        if cur is not None and cur.address == address and cur.replay == replay:
            return
        self.remove(endpoint_key)
        stream = _Stream(address, endpoint_key, False, replay=replay)
        self._streams[endpoint_key] = stream
        if self._running:
            self._open(endpoint_key, stream)

    def remove(self, endpoint_key: str) -> None:
        stream = self._streams.pop(endpoint_key, None)
        self._last_seq.pop(endpoint_key, None)
        if stream is not None:
            self._close(stream)

    def follow(
        self,
        datastore: Datastore,
        address_for: Callable[[Endpoint], str | None],
        replay_for: Callable[[Endpoint], str | None] | None = None,
    ) -> None:
        """Subscribe to every datastore endpoint `address_for` maps to a ZMQ address."""

        def added(ep: Endpoint) -> None:
            address = address_for(ep)
            if address:
                self.add(ep.key, address, replay_for(ep) if replay_for else None)

        def removed(ep: Endpoint) -> None:
            if ep.key in self._streams:
                self.remove(ep.key)

        datastore.on_endpoint_added(added)
        datastore.on_endpoint_removed(removed)
        for ep in datastore.endpoints():
            added(ep)

    @property
    def addresses(self) -> dict[str, str]:
        return {sid: s.address for sid, s in self._streams.items()}

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._running:
            return
        self._ctx = zmq.asyncio.Context()
        self._running = True
        for sid, stream in list(self._streams.items()):
            self._open(sid, stream)

    async def stop(self) -> None:
        self._running = False
        for t in list(self._replay_tasks):
            t.cancel()
        streams = list(self._streams.values())
        tasks = [s.task for s in streams if s.task is not None]
        for s in streams:
            self._close(s)
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def _open(self, sid: str, stream: _Stream) -> None:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        sock.setsockopt(zmq.SUBSCRIBE, self._topic)
        # Reconnect fast to a restarted publisher: what it sends before we are back is lost.
        sock.setsockopt(zmq.RECONNECT_IVL, 20)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 100)
        try:
            if stream.bind:
                sock.bind(stream.address)
            else:
                sock.connect(stream.address)
        except zmq.ZMQError as e:
            sock.close()
            log.error(
                "kv events: cannot %s %s: %s",
                "bind" if stream.bind else "connect",
                stream.address,
                e,
            )
            return
        stream.socket = sock
        stream.task = asyncio.create_task(self._recv_loop(sid, stream), name=f"kv-events {sid}")
        if not stream.bind and (self._on_disconnect is not None or stream.replay):
            mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
            stream.monitor = asyncio.create_task(
                self._watch(stream.key or sid, stream, mon), name=f"kv-events monitor {sid}"
            )

    def _close(self, stream: _Stream) -> None:
        if stream.monitor is not None:
            stream.monitor.cancel()
            stream.monitor = None
        if stream.task is not None:
            stream.task.cancel()
            stream.task = None
        if stream.socket is not None:
            stream.socket.close(linger=0)
            stream.socket = None

    async def _watch(self, key: str, stream: _Stream, mon: zmq.asyncio.Socket) -> None:
        """A dropped connection to a publisher: its engine may have restarted, and what it
        publishes until we are connected again is lost. A (re)connection to a publisher with
        a replay socket: ask for its stream from 0 at once, so a quiet publisher (a fresh
        engine) is known before it publishes anything."""
        try:
            while True:
                frames = await mon.recv_multipart()
                event = parse_monitor_message(frames)
                if (
                    event.get("event") == zmq.EVENT_CONNECTED
                    and stream.replay
                    and key not in self._last_seq
                    and key not in self._replaying
                ):
                    self._replaying[key] = []
                    self._replay_tasks.add(
                        asyncio.create_task(self._replay(key, stream.replay, 0, probe=True))
                    )
                elif event.get("event") == zmq.EVENT_DISCONNECTED:
                    self.disconnects += 1
                    self._last_seq.pop(key, None)
                    if self._on_disconnect is not None:
                        try:
                            self._on_disconnect(key)
                        except Exception:
                            log.exception("kv events: on_disconnect callback failed for %s", key)
        except (zmq.ZMQError, asyncio.CancelledError):
            pass
        finally:
            mon.close(linger=0)

    async def _recv_loop(self, sid: str, stream: _Stream) -> None:
        sock = stream.socket
        assert sock is not None
        while True:
            try:
                frames = await sock.recv_multipart()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as e:
                if e.errno in (zmq.ETERM, zmq.ENOTSOCK):
                    return
                log.warning("kv events %s: receive failed: %s", stream.address, e)
                await asyncio.sleep(0.1)
                continue
            self.handle_frames(frames, stream.key, default_key=None if stream.bind else sid)

    # ---- message handling (sync; public so other transports/tests can feed frames) -------------
    def handle_frames(
        self, frames: list[bytes], key: str | None = None, default_key: str | None = None
    ) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.dropped += 1
            return
        topic, seq_b, payload = frames
        if key is None:
            parsed = parse_topic(topic)
            key = parsed[0] if parsed is not None else default_key
        if key is None:
            self.dropped += 1
            return
        seq = int.from_bytes(seq_b, "big")
        waiting = self._replaying.get(key)
        if waiting is not None:  # a replay is filling what came before: keep order
            waiting.append((seq, payload))
            return
        stream = self._streams.get(key)
        if stream is not None and stream.replay and self._running:
            last = self._last_seq.get(key)
            # First batch (the EPP joined, or reconnected) or a restarted publisher: the whole
            # stream from 0; else what the gap lost.
            start = 0 if last is None or seq <= last else last + 1
            if seq > start:
                self._replaying[key] = [(seq, payload)]
                self._replay_tasks.add(
                    asyncio.create_task(self._replay(key, stream.replay, start))
                )
                return
        self._apply(key, seq, payload)

    def _apply(self, key: str, seq: int, payload: bytes) -> None:
        self._check_seq(key, seq)
        try:
            batch = decode_batch(payload)
        except KVEventDecodeError as e:
            self.dropped += 1
            log.debug("kv events from %s: %s", key, e)
            return
        self.batches += 1
        self.dropped += batch.skipped
        on_event = self._on_event
        for ev in batch.events:
            self.events += 1
            try:
                on_event(key, ev)
            except Exception:
                self.callback_errors += 1
                log.exception("kv events: on_event callback failed for %s", key)

    async def _replay(self, key: str, address: str, start: int, probe: bool = False) -> None:
        """Ask the publisher's replay socket for the batches from `start` on, apply those
        the live stream skipped, then what arrived meanwhile."""
        got: list[tuple[int, bytes]] = []
        ended = False  # the publisher said it sent everything it has
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(address)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                frames = await asyncio.wait_for(sock.recv_multipart(), self.replay_timeout_s)
                if len(frames) < 3:
                    break
                seq = int.from_bytes(frames[-2], "big", signed=True)
                if seq < 0:
                    ended = True
                    break
                got.append((seq, frames[-1]))
        except (TimeoutError, zmq.ZMQError) as e:
            log.warning("kv events %s: replay from %s failed: %r", key, address, e)
        finally:
            sock.close(linger=0)
            self._replay_tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
        live = self._replaying.pop(key, [])
        first_live = live[0][0] if live else None
        filled = [(s, p) for s, p in got if first_live is None or s < first_live]
        complete = (
            ended
            and bool(filled)
            and [s for s, _ in filled] == list(range(start, start + len(filled)))
            and (first_live is None or filled[-1][0] == first_live - 1)
        )
        if complete:
            self.replayed += len(filled)
            log.info("kv events %s: %d missed batches replayed from %s", key, len(filled), address)
            for s, p in filled:
                self._apply(key, s, p)
        elif probe and ended and not got and not live and key not in self._last_seq:
            # Connected, and the publisher has sent nothing yet: a fresh stream, seen whole.
            self._last_seq[key] = -1
            self._stream(key, 0)
        elif got or live or not probe:
            self.replay_failures += 1
        for s, p in live:
            self._apply(key, s, p)

    def _check_seq(self, key: str, seq: int) -> None:
        last = self._last_seq.get(key)
        self._last_seq[key] = seq
        if last is None:
            self._stream(key, seq)
            return
        if seq == last + 1:
            return
        missed = seq - last - 1 if seq > last else -1  # -1: the publisher restarted
        self.gaps += 1
        log.warning(
            "kv events from %s: sequence %d after %d (%s)",
            key,
            seq,
            last,
            "publisher restarted" if missed < 0 else f"{missed} batches lost",
        )
        if self._on_gap is not None:
            try:
                self._on_gap(key, missed)
            except Exception:
                log.exception("kv events: on_gap callback failed for %s", key)
        if missed < 0:
            self._stream(key, seq)

    def _stream(self, key: str, seq: int) -> None:
        if self._on_stream is not None:
            try:
                self._on_stream(key, seq)
            except Exception:
                log.exception("kv events: on_stream callback failed for %s", key)
