"""The product's clock: monotonic seconds, read through one seam.

Everything in the EPP that stamps a request or judges the age of a signal (pick time,
first token, scraped-metrics staleness, saturation) calls `clock.now()`, so a virtual-time
simulation (`bench.vsim`) can drive the real request-control and scheduling code with its
own clock. Production never changes it. Read it as `from epp import clock; clock.now()`
(a `from epp.clock import now` binding would not follow `set_clock`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

now: Callable[[], float] = time.monotonic


def set_clock(fn: Callable[[], float] | None) -> None:
    """Use `fn` as the clock from now on; None restores `time.monotonic`."""
    global now
    now = fn if fn is not None else time.monotonic
