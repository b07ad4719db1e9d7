"""Learn each endpoint's context window from its `/v1/models` (vLLM: `max_model_len`).

Cheap by design: one GET per endpoint when it appears (retried with backoff until it
answers), then one every `refresh` seconds (a restarted engine may come back with another
`--max-model-len`). The value lands in `Endpoint.max_model_len` (0 = unknown); request
control uses it to answer over-long prompts with a 400 before any pod sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

import aiohttp
import orjson

from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint, format_hostport

log = logging.getLogger(__name__)


def max_model_len_of(doc: Any) -> int:
    """The largest `max_model_len` in an OpenAI model list (0 when none is given)."""
    best = 0
    data = doc.get("data") if isinstance(doc, dict) else None
    for card in data if isinstance(data, list) else ():
        v = card.get("max_model_len") if isinstance(card, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > best:
            best = v
    return best


class ModelInfoProbe:
    def __init__(
        self,
        datastore: Datastore,
        *,
        refresh: float = 60.0,
        timeout: float = 2.0,
        max_backoff: float = 30.0,
    ) -> None:
        self._ds = datastore
        self.refresh = refresh
        self.timeout = timeout
        self.max_backoff = max_backoff
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._listening = False
        self._running = False

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"Accept": "application/json"},
        )
        self._running = True
        if not self._listening:
            self._ds.on_endpoint_added(self._on_added)
            self._ds.on_endpoint_removed(self._on_removed)
            self._listening = True
        for ep in self._ds.endpoints():
            self._spawn(ep)

    async def stop(self) -> None:
        self._running = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _on_added(self, ep: Endpoint) -> None:
        if self._running:
            self._spawn(ep)

    def _on_removed(self, ep: Endpoint) -> None:
        task = self._tasks.pop(ep.key, None)
        if task is not None:
            task.cancel()

    def _spawn(self, ep: Endpoint) -> None:
        old = self._tasks.pop(ep.key, None)
        if old is not None:
            old.cancel()
        self._tasks[ep.key] = asyncio.create_task(self._run(ep), name=f"models {ep.key}")

    async def _run(self, ep: Endpoint) -> None:
        backoff = 0.5
        while True:
            if await self.probe(ep):
                backoff = 0.5
                delay = self.refresh
            else:
                delay = backoff
                backoff = min(self.max_backoff, backoff * 2)
            await asyncio.sleep(delay * random.uniform(0.8, 1.0))

    async def probe(self, ep: Endpoint) -> bool:
        """GET /v1/models once; True when the endpoint answered a model list."""
        if self._session is None:
            return False
        url = f"http://{format_hostport(ep.address, ep.port)}/v1/models"
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    return False
                doc = orjson.loads(await resp.read())
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError):
            return False
        length = max_model_len_of(doc)
        if length != ep.max_model_len:
            log.info("%s: max_model_len %d", ep.key, length)
            ep.max_model_len = length
        return True
