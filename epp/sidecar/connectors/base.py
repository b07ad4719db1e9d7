"""The connector interface: how a decode-pod sidecar gets a request prefilled elsewhere.

A connector turns the client's request into (1) whatever the prefill pod must be sent and
(2) the body the local (decode) engine must get. vLLM's NIXL style is two-phase (prefill
first, its `kv_transfer_params` go into the decode request); SGLang's bootstrap style
sends both at once. Failures are reported as exceptions the server maps onto behaviour:

* `PrefillFailed` (connection refused, timeout, 5xx, 429, an answer without KV
  parameters): decode locally instead, and say so (`x-epp-pd: local-fallback`);
* `PrefillRejected` (a 4xx from the prefill pod: the request itself is bad): the client
  gets that answer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp


class PrefillFailed(Exception):
    """The remote prefill did not work out; `reason` is a metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PrefillRejected(Exception):
    """The prefill pod refused the request itself (4xx): pass its answer to the client."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(f"prefill pod answered {status}")
        self.status = status
        self.body = body
        self.content_type = content_type


@dataclass(slots=True)
class PrefillRequest:
    http: aiohttp.ClientSession  # for prefill pods (no total timeout; the caller bounds it)
    target: str  # "ip:port" of the prefill pod, already allowed
    path: str  # request path (and query) as the client sent it
    headers: dict[str, str]  # to forward (request id, content type, authorization...)
    body: dict[str, Any]  # the client's request, parsed; connectors must not mutate it
    chat: bool  # /v1/chat/completions (max_completion_tokens applies)
    request_id: str

    @property
    def url(self) -> str:
        return f"http://{self.target}{self.path}"


@dataclass(slots=True)
class DecodePlan:
    body: bytes  # what the local engine gets
    # A prefill request still running while the decode runs (SGLang style); the server
    # cancels it if the client goes away and awaits it when the decode ends.
    background: asyncio.Task[None] | None = None
    detail: dict[str, Any] | None = None  # for the request's log line


class Connector:
    name: ClassVar[str] = ""
    # Bytes whose presence in a raw body means it may carry this connector's fields (a cheap
    # test before parsing a locally decoded request to strip them).
    client_marker: ClassVar[bytes] = b"kv_transfer_params"

    @classmethod
    def from_settings(cls, settings: Any) -> Connector:
        """Build from the sidecar's settings (connectors with options read theirs)."""
        return cls()

    async def prepare(self, req: PrefillRequest) -> DecodePlan:
        raise NotImplementedError

    def strip_client_params(self, body: dict[str, Any]) -> bool:
        """Remove client-supplied connector fields from a request that is decoded locally
        (they could point the engine's KV pull at any host). True if something was removed."""
        return False


def status_failure(status: int) -> PrefillFailed | None:
    """5xx, 408 and 429 from a prefill pod are its trouble, not the request's."""
    if status >= 500 or status in (408, 429):
        return PrefillFailed(f"http_{status}", f"prefill pod answered HTTP {status}")
    return None
