"""Plugin registry: config `type` → plugin class. A new plugin is one file plus one line here."""

from __future__ import annotations

from epp.scheduling.framework import Plugin
from epp.scheduling.plugins.cost_filter import CostAwareFilter
from epp.scheduling.plugins.delay_cost_scorer import DelayCostScorer
from epp.scheduling.plugins.filters import (
    BusinessFilter,
    DecodeFilter,
    HealthFilter,
    PrefillFilter,
    RoleFilter,
)
from epp.scheduling.plugins.inflight_scorer import ActiveRequestScorer, InFlightScorer
from epp.scheduling.plugins.kv_cache_scorer import KVCacheUtilizationScorer
from epp.scheduling.plugins.latency_scorer import LatencyScorer, SLOScorer
from epp.scheduling.plugins.pickers import MaxScorePicker, RandomPicker, WeightedRandomPicker
from epp.scheduling.plugins.precise_prefix_scorer import PrecisePrefixCacheScorer
from epp.scheduling.plugins.prefix_scorer import PrefixCacheScorer
from epp.scheduling.plugins.profile_handlers import PDProfileHandler, SingleProfileHandler
from epp.scheduling.plugins.queue_scorer import QueueScorer
from epp.scheduling.plugins.session_scorer import SessionAffinityScorer
from epp.scheduling.plugins.tokenizer_config import TokenizerConfig

PLUGINS: dict[str, type[Plugin]] = {
    cls.type_name: cls
    for cls in (
        BusinessFilter,
        RoleFilter,
        DecodeFilter,
        PrefillFilter,
        HealthFilter,
        CostAwareFilter,
        QueueScorer,
        KVCacheUtilizationScorer,
        InFlightScorer,
        ActiveRequestScorer,
        PrefixCacheScorer,
        PrecisePrefixCacheScorer,
        TokenizerConfig,
        SessionAffinityScorer,
        LatencyScorer,
        SLOScorer,
        DelayCostScorer,
        MaxScorePicker,
        WeightedRandomPicker,
        RandomPicker,
        SingleProfileHandler,
        PDProfileHandler,
    )
}

# Names other EPPs use for plugins we implement under another name.
ALIASES: dict[str, str] = {
    "load-aware-scorer": "inflight-scorer",
    "kv-cache-scorer": "kv-cache-utilization-scorer",
    "prefix-scorer": "prefix-cache-scorer",
    "session-affinity": "session-affinity-scorer",
    "prefill-header-handler": "",  # we always set x-prefiller-host-port: accepted and ignored
}


def lookup(type_name: str) -> type[Plugin] | None:
    """The class for a config type; None for a known no-op alias. KeyError if unknown."""
    canonical = ALIASES.get(type_name, type_name)
    if canonical == "":
        return None
    if canonical not in PLUGINS:
        known = ", ".join(sorted(PLUGINS))
        raise KeyError(f"unknown plugin type {type_name!r}; known types: {known}")
    return PLUGINS[canonical]
