"""The `epp reconcile` loop: watch ModelPools and what they own, reconcile pools one by one.

Every watched event maps to a pool key (namespace, name): ModelPools directly, owned objects
and pods through their `epp.dev/pool` label. Keys are de-duplicated in a queue and handled
by one worker; failed passes are retried with exponential backoff, and every pool is
re-reconciled every `resync` seconds (which also picks up template ConfigMap edits).
Watches resume from the last resourceVersion and relist on 410 Gone or errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from epp.api.modelpool import API_VERSION, PLURAL
from epp.reconcile.apply import ApplySettings
from epp.reconcile.kube import ApiError, Kube, path_for
from epp.reconcile.reconciler import Result, reconcile
from epp.reconcile.render import LABEL_POOL, OWNED_KINDS

log = logging.getLogger(__name__)
Key = tuple[str, str]


class Controller:
    def __init__(self, kube: Kube, namespace: str = "", settings: ApplySettings | None = None,
                 resync: float = 30.0, debounce: float = 0.05) -> None:
        self.kube = kube
        self.namespace = namespace
        self.settings = settings or ApplySettings()
        self.resync = resync
        self.debounce = debounce
        self.queue: asyncio.Queue[Key] = asyncio.Queue()
        self.pending: set[Key] = set()
        self.known: set[Key] = set()
        self.failures: dict[Key, int] = {}
        self.passes = 0
        self.last: dict[Key, Result] = {}

    def enqueue(self, key: Key) -> None:
        if key not in self.pending:
            self.pending.add(key)
            self.queue.put_nowait(key)

    def _key(self, obj: dict[str, Any], is_pool: bool) -> Key | None:
        meta = obj.get("metadata") or {}
        name = meta.get("name") if is_pool else (meta.get("labels") or {}).get(LABEL_POOL)
        return (meta.get("namespace", ""), name) if name else None

    async def _watch(self, api_version: str, plural: str, is_pool: bool) -> None:
        path = path_for(api_version, plural, self.namespace)
        selector = "" if is_pool else LABEL_POOL
        backoff = 0.5
        while True:
            try:
                listed = await self.kube.list_objects(path, selector)
                for item in listed.get("items") or []:
                    key = self._key(item, is_pool)
                    if key:
                        if is_pool:
                            self.known.add(key)
                        self.enqueue(key)
                rv = (listed.get("metadata") or {}).get("resourceVersion", "")
                backoff = 0.5
                while True:
                    async for ev in self.kube.watch(path, rv, selector):
                        obj = ev.get("object") or {}
                        if ev.get("type") == "ERROR":
                            raise ApiError(int(obj.get("code") or 500), "watch", obj)
                        rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
                        if ev.get("type") == "BOOKMARK":
                            continue
                        key = self._key(obj, is_pool)
                        if key:
                            if is_pool and ev.get("type") == "DELETED":
                                self.known.discard(key)
                            elif is_pool:
                                self.known.add(key)
                            self.enqueue(key)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # 410 Gone, API down, CRD missing: relist after a pause
                if isinstance(e, ApiError) and e.not_found:  # kind not served (e.g. the
                    log.debug("watch %s: not served; retrying in 60s", path)  # other PDB API)
                    await asyncio.sleep(60.0)
                    continue
                level = logging.DEBUG if isinstance(e, ApiError) and e.status == 410 else \
                    logging.INFO
                log.log(level, "watch %s: %s; relisting in %.1fs", plural, e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _retry_later(self, key: Key, delay: float) -> None:
        await asyncio.sleep(delay)
        self.enqueue(key)

    async def _worker(self) -> None:
        retries: set[asyncio.Task[None]] = set()
        while True:
            key = await self.queue.get()
            await asyncio.sleep(self.debounce)  # let a burst of events collapse into one pass
            self.pending.discard(key)
            try:
                result = await reconcile(self.kube, key[0], key[1], self.settings)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never let one pool kill the loop
                log.warning("reconcile %s/%s failed: %s", key[0], key[1], e)
                result = Result(ok=False, reason="Error", message=str(e))
            self.passes += 1
            self.last[key] = result
            if result.ok:
                self.failures.pop(key, None)
            else:
                n = self.failures[key] = self.failures.get(key, 0) + 1
                task = asyncio.create_task(self._retry_later(key, min(0.5 * 2 ** n, 60.0)))
                retries.add(task)
                task.add_done_callback(retries.discard)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync)
            for key in list(self.known):
                self.enqueue(key)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        tasks = [asyncio.create_task(self._watch(API_VERSION, PLURAL, True))]
        tasks += [asyncio.create_task(self._watch(k.api_version, k.plural, False))
                  for k in OWNED_KINDS]
        tasks.append(asyncio.create_task(self._watch("v1", "pods", False)))
        tasks.append(asyncio.create_task(self._worker()))
        tasks.append(asyncio.create_task(self._resync()))
        try:
            if stop is None:
                await asyncio.gather(*tasks)
            else:
                await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t


async def reconcile_all(kube: Kube, namespace: str, settings: ApplySettings) -> dict[Key, Result]:
    """One pass over every pool (`epp reconcile --once`)."""
    listed = await kube.list_objects(path_for(API_VERSION, PLURAL, namespace))
    out = {}
    for item in listed.get("items") or []:
        meta = item.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        out[key] = await reconcile(kube, key[0], key[1], settings)
    return out
