"""List-then-watch of one Kubernetes collection, the way client-go's reflector does it.

- The first list hands the full set of objects to `on_list`; every later event goes to
  `on_event(type, obj)` (ADDED / MODIFIED / DELETED).
- Watches resume from the last seen resourceVersion (bookmarks included) when the server
  ends them (timeout) or the connection breaks.
- 410 Gone (as an HTTP status or an ERROR event) means the resourceVersion is too old:
  relist, and hand the new full set to `on_list` again.
- API errors, refused connections and timeouts back off exponentially (with jitter) and
  retry forever; the task never dies of them. 404 on the list (CRD not installed) is
  reported as an empty list and retried at the slow `absent_retry` interval; so is 403
  for an `optional` collection (the EPP works without it; RBAC may not grant it).

Objects are plain dicts decoded with orjson (the generated client models are 10x slower).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

log = logging.getLogger(__name__)

Obj = dict[str, Any]
# A kubernetes_asyncio list call bound to its collection, called with `_preload_content=False`.
ListCall = Callable[..., Awaitable[aiohttp.ClientResponse]]


class Gone(Exception):
    """The requested resourceVersion is no longer available (HTTP 410)."""


class ApiStatusError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:200]}")
        self.status = status


@dataclass
class WatchStats:
    lists: int = 0
    watches: int = 0
    events: int = 0
    gone: int = 0  # 410 responses that forced a relist
    errors: int = 0  # API / connection errors (each followed by a backoff)


_RETRYABLE = (ApiStatusError, aiohttp.ClientError, OSError, TimeoutError, ValueError)


class Reflector:
    def __init__(
        self,
        name: str,
        call: ListCall,
        on_list: Callable[[list[Obj]], None],
        on_event: Callable[[str, Obj], None],
        *,
        watch_timeout: int = 300,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        absent_retry: float = 30.0,
        optional: bool = False,
    ) -> None:
        self.name = name
        self._call = call
        self._on_list = on_list
        self._on_event = on_event
        self.watch_timeout = watch_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.absent_retry = absent_retry
        self.optional = optional
        self.stats = WatchStats()
        self.resource_version: str | None = None
        self.absent = False  # the last list answered 404 (e.g. CRD not installed)

    async def run(self) -> None:
        backoff = self.backoff_initial
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                    if self.absent:
                        await asyncio.sleep(self.absent_retry)
                        self.resource_version = None
                        continue
                await self._watch()
                backoff = self.backoff_initial
            except Gone:
                self.stats.gone += 1
                log.info("%s: resourceVersion %s gone (410); relisting", self.name,
                         self.resource_version)
                self.resource_version = None
            except _RETRYABLE as exc:
                self.stats.errors += 1
                delay = backoff * (0.5 + random.random())
                log.warning("%s: %s; retrying in %.2fs", self.name, exc or type(exc).__name__,
                            delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self.backoff_max)

    async def _list(self) -> None:
        resp = await self._call(_preload_content=False,
                                _request_timeout=aiohttp.ClientTimeout(total=60))
        try:
            if resp.status == 404 or (self.optional and resp.status == 403):
                if not self.absent:
                    log.warning("%s: HTTP %s on list; treated as empty, retrying every %.0fs",
                                self.name, resp.status, self.absent_retry)
                self.absent = True
                self.stats.lists += 1
                self._on_list([])
                return
            body = await resp.read()
            if resp.status != 200:
                raise ApiStatusError(resp.status, body.decode(errors="replace"))
        finally:
            resp.release()
        doc = orjson.loads(body)
        self.absent = False
        self.stats.lists += 1
        self._on_list(list(doc.get("items") or []))
        self.resource_version = str(doc["metadata"]["resourceVersion"])

    async def _watch(self) -> None:
        assert self.resource_version is not None
        resp = await self._call(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout,
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=10, sock_read=self.watch_timeout + 30
            ),
        )
        try:
            if resp.status == 410:
                raise Gone()
            if resp.status != 200:
                text = (await resp.read()).decode(errors="replace")
                raise ApiStatusError(resp.status, text)
            self.stats.watches += 1
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    line, buf = buf[:nl], buf[nl + 1 :]
                    if line.strip():
                        self._handle(orjson.loads(line))
        finally:
            resp.release()

    def _handle(self, event: Obj) -> None:
        etype = event.get("type")
        obj = event.get("object") or {}
        if etype == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Gone()
            raise ApiStatusError(int(code or 500), str(obj.get("message", "")))
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            self.resource_version = str(rv)
        if etype == "BOOKMARK":
            return
        self.stats.events += 1
        self._on_event(str(etype), obj)
