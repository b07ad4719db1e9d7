"""`asyncio.run` for the load tools: SIGTERM cancels the run as Ctrl-C does, so the pool,
routers and Envoys a run started are stopped by their context managers instead of being
left running (a killed `bench.run` used to orphan its simulator pool)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion; on SIGTERM cancel it, let its cleanup run, and exit 143."""

    async def until_terminated() -> T:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await task
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        return asyncio.run(until_terminated())
    except asyncio.CancelledError:
        raise SystemExit(128 + signal.SIGTERM) from None
