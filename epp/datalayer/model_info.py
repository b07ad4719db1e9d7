"""Learn each endpoint's context window from its `/v1/models` (vLLM: `max_model_len`).

Cheap by design: one GET per endpoint when it appears (retried with backoff until it
answers), then one every `refresh` seconds (a restarted engine may come back with another
`--max-model-len`). The value lands in `Endpoint.max_model_len` (0 = unknown); request
control uses it to answer over-long prompts with a 400 before any pod sees them.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import aiohttp
import orjson

from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint, format_hostport
from epp.datalayer.endpoint_tasks import EndpointTasks

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


class ModelInfoProbe(EndpointTasks):
    task_name = "models"

    def __init__(
        self,
        datastore: Datastore,
        *,
        refresh: float = 60.0,
        timeout: float = 2.0,
        max_backoff: float = 30.0,
    ) -> None:
        super().__init__(datastore)
        self.refresh = refresh
        self.timeout = timeout
        self.max_backoff = max_backoff

    async def start(self) -> None:
        self._start_tasks(
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Accept": "application/json"},
            )
        )

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
