"""The `flowControl:` section of an EndpointPickerConfig → plain settings objects.

The shape follows the ecosystem's EndpointPickerConfig (llm-d router / GIE) so its configs
read the same here:

    featureGates: [flowControl]          # on/off (on unless `flowControl=false`)
    flowControl:
      maxRequests: 2000                  # all bands together (0 / absent = no limit)
      maxBytes: 1Gi
      defaultRequestTTL: 20s             # longest wait in the queue, then 429
      defaultPriorityBand:               # template for priorities not listed below
        maxRequests: 1000
        fairnessPolicyRef: work-fairness-policy     # the default
        orderingPolicyRef: fcfs-ordering-policy
      defaultNegativePriorityBand: {maxRequests: 50}     # template for priority < 0
      priorityBands:
      - {priority: 1, maxRequests: 500, orderingPolicyRef: slo-deadline-ordering-policy}
      saturationDetector: {pluginRef: my-detector}      # a `plugins:` entry, or inline params

Per-band `requestTTL` is this EPP's addition. Keys of the ecosystem this EPP does not
implement (`usageLimitPolicyPluginRef`, `enableEviction`, `noEndpointRequestTTL`) and any
unknown key are a `ConfigError`, never silently ignored.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from epp.requestcontrol.flowcontrol.fairness import FAIRNESS_POLICIES, FairnessPolicy
from epp.requestcontrol.flowcontrol.ordering import ORDERING_POLICIES, OrderingPolicy
from epp.requestcontrol.flowcontrol.saturation import DETECTOR_TYPES, SaturationDetector
from epp.scheduling.config import ConfigError, EndpointPickerConfig
from epp.scheduling.services import Services

log = logging.getLogger(__name__)

FEATURE_GATE = "flowControl"
# Whether flow control runs when the config does not name the feature gate either way. On:
# with work fairness (the default policy) a tenant alone or within its share is never held,
# so flow control costs a lone tenant nothing and holds only tenants over their share
# (bench/RESULTS.md: multi_tenant, and no loss on the single-tenant scenarios).
ENABLED_BY_DEFAULT = True

DEFAULT_BAND_MAX_REQUESTS = 5000
DEFAULT_BAND_MAX_BYTES = 1 << 30
DEFAULT_REQUEST_TTL_S = 20.0  # below the 30 s ext_proc message_timeout of our gateways
DEFAULT_FAIRNESS = "work-fairness-policy"
# The detector when the config names none: a pod is full for tenants over their share once
# a new request would wait more than this for its prefill to start (the latency model's
# queue estimate, the signal the EPP models best). An explicit detector section keeps the
# ecosystem's defaults (queue depth 5, KV use 0.8) for what it does not set.
DEFAULT_DETECTOR: dict[str, Any] = {
    "maxPredictedTTFT": "300ms",
    "queueDepthThreshold": 0,
    "kvCacheUtilThreshold": 0,
}
DEFAULT_ORDERING = "fcfs-ordering-policy"

# Plugin types the flow-control section may reference from `plugins:`; the scheduler's loader
# never sees them.
PLUGIN_TYPES = frozenset({*DETECTOR_TYPES, *FAIRNESS_POLICIES, *ORDERING_POLICIES})

_UNSUPPORTED = {
    "usageLimitPolicyPluginRef": "adaptive usage-limit policies are not implemented",
    "enableEviction": "eviction of in-flight requests is not implemented",
    "noEndpointRequestTTL": "a pool without endpoints answers 503 at once",
}
_TOP_KEYS = {
    "maxRequests",
    "maxBytes",
    "defaultRequestTTL",
    "defaultPriorityBand",
    "defaultNegativePriorityBand",
    "priorityBands",
    "saturationDetector",
}
_BAND_KEYS = {
    "priority",
    "maxRequests",
    "maxBytes",
    "fairnessPolicyRef",
    "orderingPolicyRef",
    "requestTTL",
}


@dataclass(slots=True)
class BandSettings:
    priority: int
    max_requests: int
    max_bytes: int
    fairness: FairnessPolicy
    ordering: OrderingPolicy
    ttl_s: float  # 0 = no limit


@dataclass(slots=True)
class FlowControlSettings:
    detector: SaturationDetector
    max_requests: int = 0  # 0 = no global limit
    max_bytes: int = 0
    request_ttl_s: float = DEFAULT_REQUEST_TTL_S
    bands: dict[int, BandSettings] = field(default_factory=dict)
    default_band: dict[str, Any] = field(default_factory=dict)
    negative_band: dict[str, Any] | None = None
    # policies by name, for bands made from the templates on first use
    policies: dict[str, FairnessPolicy | OrderingPolicy] = field(default_factory=dict)
    plugin_specs: dict[str, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)

    def band(self, priority: int) -> BandSettings:
        """The settings of `priority`'s band, made from the template on first use."""
        b = self.bands.get(priority)
        if b is None:
            tmpl = self.negative_band if priority < 0 and self.negative_band is not None else None
            b = self._make_band(priority, tmpl if tmpl is not None else self.default_band)
            self.bands[priority] = b
        return b

    def _make_band(self, priority: int, spec: Mapping[str, Any]) -> BandSettings:
        where = f"flowControl band {priority}"
        fairness = self._policy(spec.get("fairnessPolicyRef") or DEFAULT_FAIRNESS, "fairness")
        ordering = self._policy(spec.get("orderingPolicyRef") or DEFAULT_ORDERING, "ordering")
        assert isinstance(fairness, FairnessPolicy) and isinstance(ordering, OrderingPolicy)
        ttl = spec.get("requestTTL")
        return BandSettings(
            priority=priority,
            max_requests=quantity(spec.get("maxRequests"), f"{where}: maxRequests")
            or DEFAULT_BAND_MAX_REQUESTS,
            max_bytes=quantity(spec.get("maxBytes"), f"{where}: maxBytes")
            or DEFAULT_BAND_MAX_BYTES,
            fairness=fairness,
            ordering=ordering,
            ttl_s=self.request_ttl_s if ttl is None else duration(ttl, f"{where}: requestTTL"),
        )

    def _policy(self, ref: Any, kind: str) -> FairnessPolicy | OrderingPolicy:
        if not isinstance(ref, str):
            raise ConfigError(f"flowControl: {kind}PolicyRef must be a string, not {ref!r}")
        cached = self.policies.get(ref)
        if cached is not None:
            return cached
        type_name, params = self.plugin_specs.get(ref, (ref, {}))
        table: Mapping[str, Any] = FAIRNESS_POLICIES if kind == "fairness" else ORDERING_POLICIES
        cls = table.get(type_name)
        if cls is None:
            known = ", ".join(sorted(table))
            raise ConfigError(
                f"flowControl: unknown {kind} policy {ref!r} (a plugin name or one of: {known})"
            )
        try:
            policy: FairnessPolicy | OrderingPolicy = cls(params)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"flowControl {kind} policy {ref!r}: {e}") from e
        self.policies[ref] = policy
        return policy


def feature_enabled(cfg: EndpointPickerConfig) -> bool:
    gates = (cfg.model_extra or {}).get("featureGates") or []
    if not isinstance(gates, list):
        raise ConfigError("featureGates must be a list of names")
    enabled = ENABLED_BY_DEFAULT
    for g in gates:
        name, _, value = str(g).partition("=")
        if name.strip() == FEATURE_GATE:
            v = value.strip().lower()
            if v not in ("", "true", "false"):
                raise ConfigError(f"featureGates: {g!r}: the value must be true or false")
            enabled = v != "false"
    return enabled


def parse_flow_control(
    cfg: EndpointPickerConfig, services: Services | None = None
) -> FlowControlSettings | None:
    """The flow-control settings of `cfg`, or None when flow control is off."""
    extra = cfg.model_extra or {}
    section = extra.get("flowControl")
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError("flowControl must be a mapping")
    enabled = feature_enabled(cfg)
    if not enabled:
        if section:
            log.warning(
                "the flowControl section is ignored: flow control is off "
                "(add `featureGates: [flowControl]` to turn it on)"
            )
        return None
    for key in section:
        if key in _UNSUPPORTED:
            raise ConfigError(f"flowControl.{key} is not supported: {_UNSUPPORTED[key]}")
        if key not in _TOP_KEYS:
            raise ConfigError(
                f"flowControl: unknown key {key!r}; known keys: {', '.join(sorted(_TOP_KEYS))}"
            )
    services = services or Services()
    specs: dict[str, tuple[str, Mapping[str, Any]]] = {
        (s.name or s.type): (s.type, s.parameters) for s in cfg.plugins if s.type in PLUGIN_TYPES
    }
    settings = FlowControlSettings(
        detector=_detector(section.get("saturationDetector"), extra, specs, services),
        max_requests=quantity(section.get("maxRequests"), "flowControl.maxRequests"),
        max_bytes=quantity(section.get("maxBytes"), "flowControl.maxBytes"),
        request_ttl_s=DEFAULT_REQUEST_TTL_S
        if section.get("defaultRequestTTL") is None
        else duration(section["defaultRequestTTL"], "flowControl.defaultRequestTTL"),
        default_band=_band_spec(section.get("defaultPriorityBand"), "defaultPriorityBand", False),
        negative_band=(
            _band_spec(section["defaultNegativePriorityBand"], "defaultNegativePriorityBand", False)
            if section.get("defaultNegativePriorityBand") is not None
            else None
        ),
        plugin_specs=specs,
    )
    bands = section.get("priorityBands") or []
    if not isinstance(bands, list):
        raise ConfigError("flowControl.priorityBands must be a list")
    for i, raw in enumerate(bands):
        spec = _band_spec(raw, f"priorityBands[{i}]", True)
        prio = spec["priority"]
        if prio in settings.bands:
            raise ConfigError(f"flowControl.priorityBands: priority {prio} is listed twice")
        settings.bands[prio] = settings._make_band(prio, spec)
    # Build the templates once now so that a bad policy name fails at load, not per request.
    settings._make_band(0, settings.default_band)
    if settings.negative_band is not None:
        settings._make_band(-1, settings.negative_band)
    return settings


def _band_spec(raw: Any, where: str, needs_priority: bool) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"flowControl.{where} must be a mapping")
    for key in raw:
        if key not in _BAND_KEYS or (key == "priority" and not needs_priority):
            raise ConfigError(f"flowControl.{where}: unknown key {key!r}")
    if needs_priority:
        prio = raw.get("priority")
        if not isinstance(prio, int) or isinstance(prio, bool):
            raise ConfigError(f"flowControl.{where}: priority must be an integer")
    return dict(raw)


def _detector(
    section: Any,
    extra: Mapping[str, Any],
    specs: Mapping[str, tuple[str, Mapping[str, Any]]],
    services: Services,
) -> SaturationDetector:
    type_name = "saturation-detector"
    params: Mapping[str, Any] = {}
    if section is None:
        legacy = extra.get("saturationDetector")  # GIE's older top-level section
        if legacy is not None:
            if not isinstance(legacy, dict):
                raise ConfigError("saturationDetector must be a mapping")
            type_name, params = "utilization-detector", legacy
        else:
            params = DEFAULT_DETECTOR
    elif not isinstance(section, dict):
        raise ConfigError("flowControl.saturationDetector must be a mapping")
    elif "pluginRef" in section:
        if len(section) > 1:
            raise ConfigError("flowControl.saturationDetector: give pluginRef or parameters")
        ref = section["pluginRef"]
        if ref in specs:
            type_name, params = specs[ref]
        elif ref in DETECTOR_TYPES:
            type_name = ref
        else:
            raise ConfigError(f"flowControl.saturationDetector: no plugin named {ref!r}")
        if type_name not in DETECTOR_TYPES:
            raise ConfigError(f"flowControl.saturationDetector: {ref!r} is not a detector")
    else:
        params = section
    try:
        return SaturationDetector(type_name, params, services.latency)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"flowControl saturation detector: {e}") from e


# ---- value syntax ----------------------------------------------------------------------------
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}  # fmt: skip
_QUANTITY_RE = re.compile(r"(\d+(?:\.\d+)?)([KMGTP]i?|k)?")
_QUANTITY_UNITS = {
    None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50,
}  # fmt: skip


def duration(value: Any, where: str) -> float:
    """A Go-style duration ("150ms", "1m30s", "0s") or a number of seconds → seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} is not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"{where}: must not be negative")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {value!r} is not a duration like 500ms or 30s")
    text = value.strip()
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ConfigError(f"{where}: {value!r} is not a duration like 500ms or 30s")
    return total


def quantity(value: Any, where: str) -> int:
    """A Kubernetes quantity ("100", "1k", "1Gi") or an integer; None → 0 (unset)."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} is not a quantity")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{where}: must not be negative")
        return value
    if isinstance(value, str):
        m = _QUANTITY_RE.fullmatch(value.strip())
        if m:
            return int(float(m.group(1)) * _QUANTITY_UNITS[m.group(2)])
    raise ConfigError(f"{where}: {value!r} is not a quantity like 100, 1k or 1Gi")
