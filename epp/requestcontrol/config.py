"""EndpointPickerConfig → the request-control pipeline: lifecycle hooks + the scheduler.

The same `plugins:` list names scheduler plugins, lifecycle hooks and flow-control
plugins (saturation detectors, fairness and ordering policies); hooks and flow-control
plugins are taken out here and the rest goes to the scheduler's loader. When a config names
no hook, the defaults run (`registry.DEFAULT_HOOKS`); in-flight accounting runs always.
A config that names no scheduler plugin and no profile (say, only `featureGates` and
`flowControl`) schedules with the built-in default.
The `flowControl:` section (with `featureGates: [flowControl]`) is parsed by
`flowcontrol.config`; `flow_control` is None when flow control is off. `latencyPriors:`
(epp.scheduling.priors_config) sets the latency model's starting speeds.
"""

from __future__ import annotations

from dataclasses import dataclass

from epp.requestcontrol.flowcontrol import config as flow_config
from epp.requestcontrol.lifecycle import LifecycleHook
from epp.requestcontrol.registry import DEFAULT_HOOKS, HOOKS, REQUIRED_HOOKS
from epp.scheduling.config import (
    DEFAULT_CONFIG,
    ConfigError,
    EndpointPickerConfig,
    build_scheduler,
    parse_config,
)
from epp.scheduling.latency_model import LatencyPriors
from epp.scheduling.scheduler import PluginTimer, Scheduler
from epp.scheduling.services import Services


@dataclass(slots=True)
class RequestControl:
    scheduler: Scheduler
    hooks: list[LifecycleHook]
    config: EndpointPickerConfig
    flow_control: flow_config.FlowControlSettings | None = None


def default_hooks(services: Services) -> list[LifecycleHook]:
    return [HOOKS[t](t, None, services) for t in DEFAULT_HOOKS]


def build_request_control(
    config: EndpointPickerConfig | str | None = None,
    *,
    services: Services | None = None,
    timer: PluginTimer | None = None,
    debug: bool = False,
) -> RequestControl:
    cfg = (
        parse_config(DEFAULT_CONFIG if config is None else config)
        if not isinstance(config, EndpointPickerConfig)
        else config
    )
    services = services or Services()
    hook_specs = [s for s in cfg.plugins if s.type in HOOKS]
    not_scheduler = HOOKS.keys() | flow_config.PLUGIN_TYPES
    sched_plugins = [s for s in cfg.plugins if s.type not in not_scheduler]
    profiles = cfg.schedulingProfiles
    if not sched_plugins and not profiles:
        # Only hooks, flow control or feature gates given: the built-in scheduling runs.
        default = parse_config(DEFAULT_CONFIG)
        sched_plugins, profiles = default.plugins, default.schedulingProfiles
    sched_cfg = cfg.model_copy(update={"plugins": sched_plugins, "schedulingProfiles": profiles})
    scheduler = build_scheduler(sched_cfg, services=services, timer=timer, debug=debug)
    hooks: list[LifecycleHook] = []
    names: set[str] = set()
    for spec in hook_specs:
        name = spec.name or spec.type
        if name in names:
            raise ConfigError(f"plugin name {name!r} is defined twice")
        names.add(name)
        try:
            hooks.append(HOOKS[spec.type](name, spec.parameters, services))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"plugin {name!r}: {e}") from e
    wanted = REQUIRED_HOOKS if hook_specs else DEFAULT_HOOKS
    present = {type(h).type_name for h in hooks}
    for t in wanted:
        if t not in present:
            hooks.append(HOOKS[t](t, None, services))
    flow_control = flow_config.parse_flow_control(cfg, services)
    # Last: a config that fails to build leaves a running EPP's learned state as it was.
    priors = cfg.latencyPriors
    services.latency.set_priors(priors.priors() if priors is not None else LatencyPriors())
    return RequestControl(scheduler, hooks, cfg, flow_control)
