"""A histogram and a counter for the request path: plain lists and no lock.

prometheus_client's Histogram takes a lock and walks its buckets in Python on every
observation (~2 µs); a request observes a dozen of them (phases, plugins, scheduling).
The EPP updates these on the event loop thread only, so a list of counts and a float sum
per label set do, exported at scrape time in the same exposition format.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class FastHistogramChild:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value


class FastHistogram(Collector):
    """Same constructor shape as prometheus_client.Histogram (name, help, labels, buckets);
    single-threaded use only."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        self._children: dict[tuple[str, ...], FastHistogramChild] = {}
        self._solo = FastHistogramChild(self.bounds) if not self.labelnames else None
        registry.register(self)

    def labels(self, *values: str) -> FastHistogramChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}")
            child = self._children[values] = FastHistogramChild(self.bounds)
        return child

    def observe(self, value: float) -> None:
        if self._solo is None:
            raise ValueError(f"{self.name} has labels: use .labels(...).observe()")
        self._solo.observe(value)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        children = [((), self._solo)] if self._solo is not None else list(self._children.items())
        edges = [*(floatToGoString(b) for b in self.bounds), "+Inf"]  # type: ignore[no-untyped-call]
        for values, child in children:
            running, cumulative = 0, []
            for edge, n in zip(edges, child.counts, strict=True):
                running += n
                cumulative.append((edge, running))
            fam.add_metric(list(values), cumulative, child.sum)
        yield fam


class FastCounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class FastCounter(Collector):
    """A labelled counter for the request path, like prometheus_client.Counter
    (`name` may end in `_total`); single-threaded use only."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], FastCounterChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> FastCounterChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}")
            child = self._children[values] = FastCounterChild()
        return child

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._children.items():
            fam.add_metric(list(values), child.value)
        yield fam
