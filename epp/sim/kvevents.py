"""KV-cache events over ZMQ PUB in vLLM's wire format (`--kv-events-config`).

Frames: [topic, 8-byte big-endian sequence number, msgpack([ts, events, dp_rank])], topic
`kv@<ip>:<port>@<model>`; events are tagged arrays (BlockStored / BlockRemoved /
AllBlocksCleared). PUB never blocks: a slow subscriber loses events, as with vLLM.

Replay (vLLM's `replay_endpoint`, optional): a ROUTER socket on `kv_events_replay_port`
keeps the last `REPLAY_BATCHES` batches; a client sends `[b"", start_seq (8 bytes BE)]` and
gets `[b"", seq, payload]` for every buffered batch from `start_seq` on, then
`[b"", -1 (8 bytes BE, signed), b""]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

import msgpack
import zmq
import zmq.asyncio

from epp.sim.config import SimConfig

REPLAY_BATCHES = 10_000
END_SEQ = (-1).to_bytes(8, "big", signed=True)


class KVEventPublisher:
    def __init__(self, cfg: SimConfig) -> None:
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.bind(f"tcp://{cfg.host}:{cfg.kv_events_port}")
        self.endpoint = f"tcp://{cfg.host}:{cfg.kv_events_port}"
        self._topic = f"kv@{cfg.address}@{cfg.model}".encode()
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=REPLAY_BATCHES)
        self._replay_port = cfg.kv_events_replay_port
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._host = cfg.host

    def start_replay(self) -> None:
        """Serve replay requests (needs a running event loop)."""
        if not self._replay_port or self._replay_task is not None:
            return
        sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"tcp://{self._host}:{self._replay_port}")
        self._replay = sock
        self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay(sock))

    async def _serve_replay(self, sock: zmq.asyncio.Socket) -> None:
        with contextlib.suppress(asyncio.CancelledError, zmq.ZMQError):
            while True:
                frames = await sock.recv_multipart()
                if len(frames) != 3 or len(frames[2]) != 8:
                    continue
                client, start = frames[0], int.from_bytes(frames[2], "big")
                for seq, payload in list(self._buffer):
                    if seq >= start:
                        await sock.send_multipart([client, b"", seq.to_bytes(8, "big"), payload])
                await sock.send_multipart([client, b"", END_SEQ, b""])

    def publish(self, events: list[list[object]]) -> None:
        payload = msgpack.packb([time.time(), events, 0], use_bin_type=True)
        seq = self._seq
        self._seq += 1
        if self._replay_port:
            self._buffer.append((seq, payload))
        with contextlib.suppress(zmq.Again):
            self._sock.send_multipart([self._topic, seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._replay_task is not None:
            self._replay_task.cancel()
            self._replay_task = None
        if self._replay is not None:
            self._replay.close(linger=0)
            self._replay = None
