"""EndpointPickerConfig (the ecosystem's format) → a Scheduler.

    apiVersion: inference.networking.x-k8s.io/v1alpha1
    kind: EndpointPickerConfig
    plugins:
    - type: prefix-cache-scorer      # `name` defaults to the type
      parameters: {...}
    schedulingProfiles:
    - name: default
      plugins:
      - pluginRef: prefix-cache-scorer
        weight: 2

Each profile's plugin refs are sorted by kind: filters (in order), scorers (weighted;
weight defaults to 1), exactly one picker (max-score-picker if none). The profile handler
is the configured ProfileHandler plugin, else single-profile for one profile, else
pd-profile-handler when profiles named `prefill` and `decode` exist.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from epp.api.errors import UserError
from epp.scheduling.framework import Filter, Picker, Plugin, ProfileHandler, Scorer, WeightedScorer
from epp.scheduling.plugins.pickers import MaxScorePicker
from epp.scheduling.plugins.profile_handlers import PDProfileHandler, SingleProfileHandler
from epp.scheduling.priors_config import LatencyPriorsSpec
from epp.scheduling.registry import lookup
from epp.scheduling.scheduler import PluginTimer, Profile, Scheduler
from epp.scheduling.services import Services


class ConfigError(UserError):
    pass


class PluginSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    name: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)


class PluginRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pluginRef: str
    weight: float | None = None


class ProfileSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    plugins: list[PluginRef] = Field(default_factory=list)


class EndpointPickerConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # featureGates, saturationDetector, data...
    apiVersion: str = "inference.networking.x-k8s.io/v1alpha1"
    kind: str = "EndpointPickerConfig"
    plugins: list[PluginSpec] = Field(default_factory=list)
    schedulingProfiles: list[ProfileSpec] = Field(default_factory=list)
    latencyPriors: LatencyPriorsSpec | None = None  # what a pod does before it is measured


DEFAULT_CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: health-filter
- type: business-filter
- type: decode-filter
- type: prefill-filter
- type: delay-cost-scorer
- type: max-score-picker
  parameters:
    maxNumOfEndpoints: 3  # target + 2 fallbacks the gateway retries on (docs/reliability.md)
- type: pd-profile-handler
schedulingProfiles:
- name: decode
  plugins:
  - pluginRef: health-filter
  - pluginRef: business-filter
  - pluginRef: decode-filter
  - pluginRef: delay-cost-scorer
  - pluginRef: max-score-picker
- name: prefill
  plugins:
  - pluginRef: health-filter
  - pluginRef: business-filter
  - pluginRef: prefill-filter
  - pluginRef: delay-cost-scorer
  - pluginRef: max-score-picker
"""


def parse_config(text: str) -> EndpointPickerConfig:
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        raise ConfigError(f"EndpointPickerConfig is not valid YAML: {e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("EndpointPickerConfig must be a YAML mapping")
    try:
        return EndpointPickerConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid EndpointPickerConfig: {e}") from e


def build_scheduler(
    config: EndpointPickerConfig | str | None = None,
    *,
    services: Services | None = None,
    timer: PluginTimer | None = None,
    debug: bool = False,
) -> Scheduler:
    if config is None:
        config = DEFAULT_CONFIG
    cfg = parse_config(config) if isinstance(config, str) else config
    services = services or Services()
    instances: dict[str, Plugin] = {}
    for spec in cfg.plugins:
        name = spec.name or spec.type
        if name in instances:
            raise ConfigError(f"plugin name {name!r} is defined twice")
        try:
            cls = lookup(spec.type)
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from e
        if cls is None:
            continue
        try:
            instances[name] = cls(name, spec.parameters, services)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"plugin {name!r}: {e}") from e

    profiles: dict[str, Profile] = {}
    specs = cfg.schedulingProfiles or [
        ProfileSpec(name="default", plugins=[PluginRef(pluginRef=n) for n in instances])
    ]
    for pspec in specs:
        if pspec.name in profiles:
            raise ConfigError(f"scheduling profile {pspec.name!r} is defined twice")
        prof = Profile(pspec.name)
        for ref in pspec.plugins:
            if ref.pluginRef not in instances:
                if lookup_is_noop(cfg, ref.pluginRef):
                    continue
                raise ConfigError(
                    f"profile {pspec.name!r} references unknown plugin {ref.pluginRef!r}"
                )
            plugin = instances[ref.pluginRef]
            if isinstance(plugin, Filter):
                prof.filters.append(plugin)
            elif isinstance(plugin, Scorer):
                weight = 1.0 if ref.weight is None else float(ref.weight)
                if weight < 0:
                    raise ConfigError(
                        f"profile {pspec.name!r}: negative weight for {ref.pluginRef}"
                    )
                prof.scorers.append(WeightedScorer(plugin, weight))
            elif isinstance(plugin, Picker):
                if prof.picker is not None:
                    raise ConfigError(f"profile {pspec.name!r} has more than one picker")
                prof.picker = plugin
            # profile handlers referenced from a profile are tolerated (some configs do it)
        if prof.picker is None:
            prof.picker = MaxScorePicker(services=services)
        profiles[pspec.name] = prof

    handlers = [p for p in instances.values() if isinstance(p, ProfileHandler)]
    if len(handlers) > 1:
        raise ConfigError("more than one profile handler configured")
    handler: ProfileHandler
    if handlers:
        handler = handlers[0]
    elif "prefill" in profiles and "decode" in profiles:
        handler = PDProfileHandler(services=services)
    elif len(profiles) == 1:
        handler = SingleProfileHandler(services=services)
    else:
        raise ConfigError("several scheduling profiles but no profile handler plugin")
    if isinstance(handler, PDProfileHandler) and handler.decode_profile not in profiles:
        raise ConfigError(f"pd-profile-handler needs a profile named {handler.decode_profile!r}")
    wanted = handler.params.get("profile") if isinstance(handler, SingleProfileHandler) else None
    if wanted is not None and str(wanted) not in profiles:
        raise ConfigError(f"single-profile-handler: no scheduling profile named {wanted!r}")
    return Scheduler(
        profiles, handler, list(instances.values()), services, timer=timer, debug=debug
    )


def lookup_is_noop(cfg: EndpointPickerConfig, ref: str) -> bool:
    return any((s.name or s.type) == ref and lookup(s.type) is None for s in cfg.plugins)
