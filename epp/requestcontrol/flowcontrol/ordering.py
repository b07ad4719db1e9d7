"""Ordering policies: which request of one flow's queue goes first.

A policy turns a queued item into a sort key (smaller = sooner); a flow's queue is a heap
on that key, so a policy must only read what does not change while the item waits.

* `fcfs-ordering-policy`: arrival order;
* `edf-ordering-policy`: earliest expiry first (enqueue time + the band's request TTL);
* `slo-deadline-ordering-policy`: earliest SLO deadline first (arrival + `x-slo-ttft-ms`);
  requests without one go after all that have one, in arrival order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol


class Orderable(Protocol):
    @property
    def seq(self) -> int: ...
    @property
    def enqueued_at(self) -> float: ...
    @property
    def expires_at(self) -> float: ...  # inf = never
    @property
    def slo_ttft_ms(self) -> float | None: ...


class OrderingPolicy:
    type_name = ""

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        if params:
            raise ValueError(f"{self.type_name} takes no parameters")

    def key(self, item: Orderable) -> tuple[float, int]:
        raise NotImplementedError


class FCFSOrdering(OrderingPolicy):
    type_name = "fcfs-ordering-policy"

    def key(self, item: Orderable) -> tuple[float, int]:
        return (0.0, item.seq)


class EDFOrdering(OrderingPolicy):
    type_name = "edf-ordering-policy"

    def key(self, item: Orderable) -> tuple[float, int]:
        return (item.expires_at, item.seq)


class SLODeadlineOrdering(OrderingPolicy):
    type_name = "slo-deadline-ordering-policy"

    def key(self, item: Orderable) -> tuple[float, int]:
        slo = item.slo_ttft_ms
        deadline = item.enqueued_at + slo / 1000.0 if slo is not None else math.inf
        return (deadline, item.seq)


ORDERING_POLICIES: dict[str, type[OrderingPolicy]] = {
    cls.type_name: cls for cls in (FCFSOrdering, EDFOrdering, SLODeadlineOrdering)
}
