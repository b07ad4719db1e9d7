"""Shared state the plugins of one scheduler use: the prefix index and the latency model."""

from __future__ import annotations

from dataclasses import dataclass, field

from epp.scheduling.latency_model import LatencyModel
from epp.scheduling.prefix_index import PrefixIndex


@dataclass(slots=True)
class Services:
    prefix_index: PrefixIndex = field(default_factory=PrefixIndex)
    latency: LatencyModel = field(default_factory=LatencyModel)
