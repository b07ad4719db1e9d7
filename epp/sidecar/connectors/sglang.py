"""SGLang's bootstrap-style P/D: the prefill and the decode request are sent at once, both
carrying `bootstrap_host` (the prefill pod's IP), `bootstrap_port` (its KV bootstrap
server, SGLang's default 8998) and a random `bootstrap_room` that pairs them; the decode
engine pulls the KV from the room as the prefill fills it.

There is no local fallback here: by the time the prefill could fail the decode engine is
already waiting on the room, and it reports the failure itself. The sidecar logs the failed
prefill and counts it (`epp_sidecar_prefill_errors_total`), and a client that goes away
cancels both requests.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, ClassVar

import aiohttp
import orjson

from epp.sidecar.connectors.base import (
    Connector,
    DecodePlan,
    PrefillFailed,
    PrefillRequest,
    status_failure,
)

log = logging.getLogger("epp.sidecar")
BOOTSTRAP_FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
DEFAULT_BOOTSTRAP_PORT = 8998


class SGLangConnector(Connector):
    name: ClassVar[str] = "sglang"
    client_marker: ClassVar[bytes] = b"bootstrap_"

    def __init__(self, bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT) -> None:
        self.bootstrap_port = bootstrap_port
        self._rng = random.SystemRandom()

    @classmethod
    def from_settings(cls, settings: Any) -> Connector:
        port = getattr(settings, "sglang_bootstrap_port", DEFAULT_BOOTSTRAP_PORT)
        return cls(int(port or DEFAULT_BOOTSTRAP_PORT))

    async def prepare(self, req: PrefillRequest) -> DecodePlan:
        host = req.target.rsplit(":", 1)[0].strip("[]")
        room = self._rng.getrandbits(63)
        boot = {"bootstrap_host": host, "bootstrap_port": self.bootstrap_port,
                "bootstrap_room": room}  # fmt: skip
        prefill = {**req.body, **boot, "stream": False}
        prefill.pop("stream_options", None)
        task = asyncio.create_task(self._prefill(req, orjson.dumps(prefill)))
        decode = orjson.dumps({**req.body, **boot})
        return DecodePlan(decode, background=task, detail={"bootstrap_room": room})

    async def _prefill(self, req: PrefillRequest, body: bytes) -> None:
        try:
            async with req.http.post(req.url, data=body, headers=req.headers) as r:
                await r.read()
                status = r.status
        except (aiohttp.ClientError, OSError) as e:
            reason = "connect" if isinstance(e, aiohttp.ClientConnectorError) else "connection"
            raise PrefillFailed(reason, f"prefill request failed: {e!r}") from e
        if status != 200:
            raise status_failure(status) or PrefillFailed(
                f"http_{status}", f"prefill pod answered HTTP {status}")

    def strip_client_params(self, body: dict[str, Any]) -> bool:
        found = [k for k in BOOTSTRAP_FIELDS if k in body]
        for k in found:
            del body[k]
        return bool(found)
