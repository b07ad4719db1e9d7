"""Reload the EndpointPickerConfig (`--config-file`) at run time.

The file is polled (stat signature, read once it stopped changing for a poll, plus a
content hash every few polls for file systems with coarse mtimes; SIGHUP reads at once). New content is parsed and built into a fresh
scheduler, hooks and flow control before anything changes; only a config that builds is
swapped in (`Director.reconfigure`), in one step on the event loop. Requests already
picked keep the decision objects and hooks they started with; queued requests move to the
new queue. A bad file keeps the running config, logs why and counts
`epp_config_reload_total{result="error"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

_REHASH_EVERY = 5


class ConfigFileWatcher:
    """Calls `apply(text)` when the file's content changes; `apply` returns True if the new
    config was taken, or raises / returns False to keep the old one (then the same content
    is not retried until it changes again)."""

    def __init__(
        self,
        path: str,
        apply: Callable[[str], bool],
        *,
        interval: float = 1.0,
        initial_text: str | None = None,
    ) -> None:
        self.path = path
        self.apply = apply
        self.interval = max(0.01, interval)
        self._sig: tuple[int, int, int] | None = None
        self._digest = _digest(initial_text.encode()) if initial_text is not None else None
        self._polls = 0
        self._task: asyncio.Task[None] | None = None
        self._missing_logged = False
        self._settling = False
        with contextlib.suppress(OSError):
            self._sig = _stat(path)

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:  # the watcher must outlive any surprise
                log.exception("config file %s: unexpected error while reloading", self.path)

    def check(self, force: bool = False) -> bool:
        """One poll; True if a new config was applied."""
        self._polls += 1
        try:
            sig = _stat(self.path)
        except OSError as e:
            if not self._missing_logged:
                log.error("config file %s cannot be read (%s); keeping the running config",
                          self.path, e)  # fmt: skip
                self._missing_logged = True
            self._sig = None
            return False
        self._missing_logged = False
        changed = sig != self._sig
        self._sig = sig
        if changed and not force:
            self._settling = True  # read once the file has stopped changing (next poll)
            return False
        if not (force or self._settling or self._polls % _REHASH_EVERY == 0):
            return False
        self._settling = False
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            log.error(
                "config file %s cannot be read (%s); keeping the running config", self.path, e
            )
            return False
        digest = _digest(data)
        if digest == self._digest:
            return False
        self._digest = digest
        return self.apply(data.decode("utf-8", "replace"))


def _stat(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()
