"""One background task per endpoint over a shared HTTP session: the lifecycle that the
metrics scraper and the model-info probe share. Tasks follow the datastore (started when an
endpoint is added, cancelled when it is removed); `stop` cancels them and closes the session.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint


async def cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel every task, then wait for each to finish."""
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t


class EndpointTasks:
    task_name = "endpoint"  # the tasks are named "<task_name> <endpoint key>"

    def __init__(self, datastore: Datastore) -> None:
        self._ds = datastore
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running = False
        self._listening = False

    def _start_tasks(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._running = True
        if not self._listening:  # the datastore has no unsubscribe; subscribe once
            self._ds.on_endpoint_added(self._on_added)
            self._ds.on_endpoint_removed(self._on_removed)
            self._listening = True
        for ep in self._ds.endpoints():
            self._spawn(ep)

    async def stop(self) -> None:
        self._running = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(tasks)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self, ep: Endpoint) -> None:
        raise NotImplementedError

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
        self._tasks[ep.key] = asyncio.create_task(self._run(ep), name=f"{self.task_name} {ep.key}")
