"""KV-cache events over ZMQ PUB in vLLM's wire format (`--kv-events-config`).

Frames: [topic, 8-byte big-endian sequence number, msgpack([ts, events, dp_rank])], topic
`kv@<ip>:<port>@<model>`; events are tagged arrays (BlockStored / BlockRemoved /
AllBlocksCleared). PUB never blocks: a slow subscriber loses events, as with vLLM.
"""

from __future__ import annotations

import contextlib
import time

import msgpack
import zmq

from epp.sim.config import SimConfig


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

    def publish(self, events: list[list[object]]) -> None:
        payload = msgpack.packb([time.time(), events, 0], use_bin_type=True)
        seq = self._seq.to_bytes(8, "big")
        self._seq += 1
        with contextlib.suppress(zmq.Again):
            self._sock.send_multipart([self._topic, seq, payload], flags=zmq.NOBLOCK)

    def close(self) -> None:
        self._sock.close(linger=0)
