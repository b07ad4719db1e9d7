"""Scrape every endpoint's `/metrics` page into `Endpoint.metrics`.

One task per endpoint (started and stopped by the datastore's add/remove listeners), one
shared aiohttp session, a semaphore bounding concurrent scrapes. Each task scrapes every
`interval` seconds; after consecutive failures it backs off exponentially (up to
`max_backoff`). Failures never escape the loop: they increment
`EngineMetrics.scrape_errors`, which counts *consecutive* failures and is reset by the next
good scrape (the process-wide totals are `MetricsScraper.scrapes_total` / `errors_total`).
A failed scrape keeps the previous values; consumers judge freshness with `is_stale`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable

import aiohttp

from epp import clock
from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint, EngineMetrics
from epp.datalayer.endpoint_tasks import EndpointTasks
from epp.datalayer.prom_parse import HISTOGRAM_FIELDS, ParsedMetrics, parse_metrics

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER = 1.0
_HEADERS = {"Accept": "text/plain", "Accept-Encoding": "identity"}


def is_stale(
    ep: Endpoint, now: float | None = None, stale_after: float = DEFAULT_STALE_AFTER
) -> bool:
    """True if `ep` has no scraped metrics younger than `stale_after` seconds (monotonic)."""
    return ep.metrics.age(now) > stale_after


def apply_metrics(m: EngineMetrics, p: ParsedMetrics, now: float) -> None:
    """Copy what the page carried; signals the page lacks keep their previous value.
    A histogram's cumulative sum/count become a recent mean (EWMA of scrape deltas)."""
    values = p.values
    for name, value in values.items():
        if name not in _HISTOGRAM_PARTS:
            setattr(m, name, value)
    for field in HISTOGRAM_FIELDS:
        total, count = values.get(field + "_sum"), values.get(field + "_count")
        if total is not None and count is not None:
            _apply_histogram(m, field, total, count)
    m.updated_at = now
    m.scrape_errors = 0


_HISTOGRAM_PARTS = frozenset(f + s for f in HISTOGRAM_FIELDS for s in ("_sum", "_count"))


def _apply_histogram(m: EngineMetrics, field: str, total: float, count: float) -> None:
    prev_total, prev_count = getattr(m, field + "_sum"), getattr(m, field + "_count")
    dcount = count - prev_count
    if dcount > 0 and prev_count >= 0:
        mean_ms = (total - prev_total) / dcount * 1000.0
        if mean_ms > 0:
            recent = getattr(m, field + "_recent_ms")
            recent = mean_ms if recent == 0 else recent + 0.3 * (mean_ms - recent)
            setattr(m, field + "_recent_ms", recent)
    setattr(m, field + "_sum", total)  # also resets the baseline after a restart
    setattr(m, field + "_count", count)


class ScrapeError(Exception):
    pass


class MetricsScraper(EndpointTasks):
    task_name = "scrape"

    def __init__(
        self,
        datastore: Datastore,
        *,
        interval: float = 0.05,
        timeout: float = 0.5,
        stale_after: float = DEFAULT_STALE_AFTER,
        max_concurrency: int = 64,
        max_backoff: float = 2.0,
        on_scraped: Callable[[Endpoint], None] | None = None,
    ) -> None:
        super().__init__(datastore)
        self.on_scraped = on_scraped  # called after each good scrape of an endpoint
        self.interval = interval
        self.timeout = timeout
        self.stale_after = stale_after
        self.max_backoff = max(max_backoff, interval)
        self._sem = asyncio.Semaphore(max_concurrency)
        self.scrapes_total = 0
        self.errors_total = 0

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._running:
            return
        self._start_tasks(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers=_HEADERS,
            )
        )

    def is_stale(self, ep: Endpoint, now: float | None = None) -> bool:
        return is_stale(ep, now, self.stale_after)

    @property
    def scraping(self) -> frozenset[str]:
        """Keys of the endpoints that currently have a scrape task."""
        return frozenset(self._tasks)

    # ---- scraping ---------------------------------------------------------------------------
    async def _run(self, ep: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(random.uniform(0.0, self.interval))  # spread the first scrapes
        failures = 0
        while True:
            started = loop.time()
            if await self.scrape_once(ep):
                failures = 0
                delay = self.interval
            else:
                failures += 1
                delay = min(self.max_backoff, self.interval * 2.0 ** min(failures, 20))
                delay *= random.uniform(0.8, 1.0)
            await asyncio.sleep(max(0.0, delay - (loop.time() - started)))

    async def scrape_once(self, ep: Endpoint) -> bool:
        """Scrape `ep` once and update its metrics. Never raises (except cancellation)."""
        session = self._session
        if session is None:
            return False
        self.scrapes_total += 1
        url = ep.metrics_url
        try:
            async with self._sem, session.get(url) as resp:
                if resp.status != 200:
                    raise ScrapeError(f"HTTP {resp.status}")
                body = await resp.read()
            parsed = parse_metrics(body, ep.engine)
            if parsed.empty:
                raise ScrapeError("no known queue/running/KV metric on the page")
        except asyncio.CancelledError:
            raise
        except aiohttp.ClientConnectorError as e:
            # Nothing listens (or no route): the pod is gone or restarting. Unlike a slow
            # answer this is certain, so the health filter drops it now, until a scrape works.
            if ep.health.unreachable_until != math.inf:
                ep.health.unreachable_until = math.inf
                ep.health.connect_failures += 1
            self._failed(ep, url, f"{type(e).__name__}: {e}")
            return False
        except (aiohttp.ClientError, TimeoutError, OSError, ScrapeError) as e:
            self._failed(ep, url, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            return False
        except Exception as e:  # a parser bug must not kill the loop
            log.exception("scrape %s: unexpected error", url)
            self._failed(ep, url, repr(e), logged=True)
            return False
        if ep.metrics.scrape_errors:
            log.info("scrape %s: recovered after %d failures", url, ep.metrics.scrape_errors)
        ep.health.unreachable_until = 0.0
        apply_metrics(ep.metrics, parsed, clock.now())
        if self.on_scraped is not None:
            self.on_scraped(ep)
        return True

    def _failed(self, ep: Endpoint, url: str, why: str, *, logged: bool = False) -> None:
        self.errors_total += 1
        m = ep.metrics
        m.scrape_errors += 1
        if m.scrape_errors == 1 and not logged:  # log transitions, not every 50 ms failure
            log.warning("scrape %s failed: %s", url, why)
