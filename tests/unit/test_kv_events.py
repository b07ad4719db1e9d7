"""KV-cache events: vLLM's wire format decoded, delivered from real ZMQ PUB sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable

import msgpack
import pytest
import zmq
import zmq.asyncio

from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint
from epp.datalayer.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventDecodeError,
    KVEventSubscriber,
    decode_batch,
    encode_batch,
    parse_topic,
)

STORED = BlockStored((11, 12), None, tuple(range(32)), 16)
REMOVED = BlockRemoved((11,))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Publisher:
    """A vLLM-like publisher: PUB socket, frames [topic, seq, msgpack batch]."""

    def __init__(self, ctx: zmq.asyncio.Context, topic: str) -> None:
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.topic = topic.encode()
        self.seq = 0

    async def send(self, events: list[KVEvent], seq: int | None = None) -> None:
        seq = self.seq if seq is None else seq
        self.seq = seq + 1
        await self.sock.send_multipart(
            [self.topic, seq.to_bytes(8, "big"), encode_batch(events, ts=time.time())]
        )

    async def send_until(self, got: Callable[[], bool], timeout: float = 3.0) -> None:
        """PUB drops messages until the subscription arrives: repeat a harmless event."""
        deadline = time.monotonic() + timeout
        while not got():
            assert time.monotonic() < deadline, "subscriber never received anything"
            await self.send([AllBlocksCleared()])
            await asyncio.sleep(0.02)


@pytest.fixture
async def zctx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


class Recorder:
    def __init__(self) -> None:
        self.got: list[tuple[str, KVEvent]] = []

    def __call__(self, key: str, ev: KVEvent) -> None:
        self.got.append((key, ev))

    def real(self) -> list[tuple[str, KVEvent]]:
        return [(k, e) for k, e in self.got if not isinstance(e, AllBlocksCleared)]


# ---- decoding -----------------------------------------------------------------------------------
def test_decode_vllm_payload() -> None:
    # Exactly what vLLM's msgspec encoder emits (array_like, tagged, defaults omitted).
    payload = msgpack.packb(
        [
            1700000000.5,
            [
                ["BlockStored", [b"\x01" * 32, b"\x02" * 32], None, [1, 2, 3, 4], 2, 7, "GPU"],
                ["BlockStored", [2**64 - 1], 2**63, [5, 6], 2],
                ["BlockRemoved", [b"\x01" * 32], "GPU"],
                ["AllBlocksCleared"],
                ["SomethingNew", 1],
                ["BlockStored", "not-a-list", None, [], 16],
            ],
            3,
        ],
        use_bin_type=True,
    )
    batch = decode_batch(payload)
    assert batch.ts == 1700000000.5 and batch.dp_rank == 3 and batch.skipped == 2
    assert batch.events == (
        BlockStored((b"\x01" * 32, b"\x02" * 32), None, (1, 2, 3, 4), 2, 7, "GPU"),
        BlockStored((2**64 - 1,), 2**63, (5, 6), 2),
        BlockRemoved((b"\x01" * 32,), "GPU"),
        AllBlocksCleared(),
    )
    assert decode_batch(encode_batch(batch.events, ts=1.0, dp_rank=3)).events == batch.events
    for bad in (b"\xc1", msgpack.packb({"ts": 1}), msgpack.packb([1.0])):
        with pytest.raises(KVEventDecodeError):
            decode_batch(bad)


def test_parse_topic() -> None:
    assert parse_topic(b"kv@10.0.0.1:8000@meta-llama/Llama-3.1-8B") == (
        "10.0.0.1:8000",
        "meta-llama/Llama-3.1-8B",
    )
    assert parse_topic("kv@10.0.0.1:8000") == ("10.0.0.1:8000", "")
    assert parse_topic(b"kv@10.0.0.7@Qwen/Qwen3-32B") == ("10.0.0.7", "Qwen/Qwen3-32B")  # llm-d
    assert parse_topic(b"") is None and parse_topic(b"kv@pod-a@m") is None
    assert parse_topic(b"other@1.2.3.4:1@m") is None


def test_sequence_gaps_and_bad_frames_are_counted() -> None:
    gaps: list[tuple[str, int]] = []
    rec = Recorder()
    sub = KVEventSubscriber([], rec, on_gap=lambda k, n: gaps.append((k, n)))
    topic = b"kv@127.0.0.2:8000@m"
    payload = encode_batch([STORED])
    for seq in (0, 1, 5, 0):
        sub.handle_frames([topic, seq.to_bytes(8, "big"), payload])
    assert gaps == [("127.0.0.2:8000", 3), ("127.0.0.2:8000", -1)]  # lost 2..4; a restart
    assert sub.gaps == 2 and len(rec.got) == 4
    sub.handle_frames([topic, b"\x00", payload])  # bad seq frame
    sub.handle_frames([topic, (6).to_bytes(8, "big"), b"\xc1"])  # not msgpack
    sub.handle_frames([b"no-topic", (0).to_bytes(8, "big"), payload])  # nobody to attribute to
    assert sub.dropped == 3 and len(rec.got) == 4


# ---- real sockets ---------------------------------------------------------------------------------
async def test_connect_mode_keys_from_topics(zctx: zmq.asyncio.Context) -> None:
    pub_a = Publisher(zctx, "kv@127.0.0.2:8000@m")
    pub_b = Publisher(zctx, "kv@127.0.0.3:8000@m")
    port_a = pub_a.sock.bind_to_random_port("tcp://127.0.0.1")
    port_b = pub_b.sock.bind_to_random_port("tcp://127.0.0.1")
    rec = Recorder()
    sub = KVEventSubscriber([f"tcp://127.0.0.1:{port_a}", f"tcp://127.0.0.1:{port_b}"], rec)
    await sub.start()
    try:
        await pub_a.send_until(lambda: any(k == "127.0.0.2:8000" for k, _ in rec.got))
        await pub_b.send_until(lambda: any(k == "127.0.0.3:8000" for k, _ in rec.got))
        await pub_a.send([STORED, REMOVED])
        await pub_b.send([BlockStored((99,), 98, (1,) * 16, 16)])
        await wait_for(lambda: len(rec.real()) == 3)
        assert [e for k, e in rec.real() if k == "127.0.0.2:8000"] == [STORED, REMOVED]
        assert [e for k, e in rec.real() if k == "127.0.0.3:8000"] == [
            BlockStored((99,), 98, (1,) * 16, 16)
        ]
        assert sub.gaps == 0 and sub.dropped == 0
    finally:
        await sub.stop()


async def test_configured_keys_win_and_callback_errors_are_contained(
    zctx: zmq.asyncio.Context,
) -> None:
    pub = Publisher(zctx, "")  # vLLM's default topic is empty
    port = pub.sock.bind_to_random_port("tcp://127.0.0.1")
    rec = Recorder()
    boom = {"left": 1}

    def on_event(key: str, ev: KVEvent) -> None:
        if isinstance(ev, BlockStored) and boom["left"]:
            boom["left"] -= 1
            raise RuntimeError("consumer bug")
        rec(key, ev)

    sub = KVEventSubscriber({"127.0.0.9:8000": f"tcp://127.0.0.1:{port}"}, on_event)
    await sub.start()
    try:
        await pub.send_until(lambda: bool(rec.got))
        await pub.send([STORED])  # the callback raises on this one
        await pub.send([STORED, REMOVED])
        await wait_for(lambda: len(rec.real()) == 2)
        assert rec.real() == [("127.0.0.9:8000", STORED), ("127.0.0.9:8000", REMOVED)]
        assert sub.callback_errors == 1
    finally:
        await sub.stop()


async def test_bind_mode_publishers_connect(zctx: zmq.asyncio.Context) -> None:
    port = free_port()
    rec = Recorder()
    sub = KVEventSubscriber([], rec, bind=f"tcp://127.0.0.1:{port}")
    await sub.start()
    pub = Publisher(zctx, "kv@127.0.0.4:8001@m")
    stray = Publisher(zctx, "not-a-kv-topic")
    pub.sock.connect(f"tcp://127.0.0.1:{port}")
    stray.sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        await pub.send_until(lambda: bool(rec.got))
        await stray.send_until(lambda: sub.dropped > 0)  # unattributable: dropped
        await pub.send([STORED])
        await wait_for(lambda: len(rec.real()) == 1)
        assert rec.real() == [("127.0.0.4:8001", STORED)]
        assert {k for k, _ in rec.got} == {"127.0.0.4:8001"}
    finally:
        await sub.stop()


async def test_follow_datastore(zctx: zmq.asyncio.Context) -> None:
    pub = Publisher(zctx, "")
    port = pub.sock.bind_to_random_port("tcp://127.0.0.1")
    ds = Datastore()
    ds.upsert_endpoint("t", Endpoint(address="127.0.0.5", port=8000, labels={"kv": "1"}))
    ds.upsert_endpoint("t", Endpoint(address="127.0.0.6", port=8000))  # no KV events

    def address_for(ep: Endpoint) -> str | None:
        return f"tcp://127.0.0.1:{port}" if ep.labels.get("kv") else None

    rec = Recorder()
    sub = KVEventSubscriber([], rec)
    sub.follow(ds, address_for)
    await sub.start()
    try:
        assert set(sub.addresses) == {"127.0.0.5:8000"}
        await pub.send_until(lambda: bool(rec.got))
        assert {k for k, _ in rec.got} == {"127.0.0.5:8000"}
        # A new endpoint after start is subscribed at once; a removed one is dropped.
        ds.upsert_endpoint("t", Endpoint(address="127.0.0.7", port=8000, labels={"kv": "1"}))
        assert set(sub.addresses) == {"127.0.0.5:8000", "127.0.0.7:8000"}
        await pub.send_until(lambda: any(k == "127.0.0.7:8000" for k, _ in rec.got))
        ds.remove_endpoint("127.0.0.5:8000")
        assert set(sub.addresses) == {"127.0.0.7:8000"}
        rec.got.clear()
        await pub.send([STORED])
        await wait_for(lambda: bool(rec.real()))
        await asyncio.sleep(0.05)
        assert {k for k, _ in rec.got} == {"127.0.0.7:8000"}
    finally:
        await sub.stop()
