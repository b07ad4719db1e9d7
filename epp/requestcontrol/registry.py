"""Lifecycle-hook registry: config `type` → hook class. A new hook is one file plus one line.

`DEFAULT_HOOKS` run when a config names none of them, so an ecosystem config that only
lists scheduler plugins still gets accounting, prefix-index upkeep and latency learning.
"""

from __future__ import annotations

from epp.requestcontrol.hooks.failure_learning import FailureLearning
from epp.requestcontrol.hooks.inflight import InFlightAccounting
from epp.requestcontrol.hooks.latency_learning import LatencyLearning
from epp.requestcontrol.hooks.prefix_insert import PrefixCacheInsert
from epp.requestcontrol.lifecycle import LifecycleHook

HOOKS: dict[str, type[LifecycleHook]] = {
    cls.type_name: cls
    for cls in (
        InFlightAccounting,
        PrefixCacheInsert,
        LatencyLearning,
        FailureLearning,
    )
}

# In-flight accounting is what releases a request's load: it always runs.
REQUIRED_HOOKS: tuple[str, ...] = (InFlightAccounting.type_name,)
DEFAULT_HOOKS: tuple[str, ...] = (
    InFlightAccounting.type_name,
    PrefixCacheInsert.type_name,
    LatencyLearning.type_name,
    FailureLearning.type_name,
)
