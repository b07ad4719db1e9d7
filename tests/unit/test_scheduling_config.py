"""EndpointPickerConfig loading: the default, upstream-style configs, and every error path."""

from __future__ import annotations

import pytest

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.config import DEFAULT_CONFIG, ConfigError, build_scheduler, parse_config
from epp.scheduling.plugins.filters import BusinessFilter, DecodeFilter, HealthFilter
from epp.scheduling.plugins.kv_cache_scorer import KVCacheUtilizationScorer
from epp.scheduling.plugins.pickers import MaxScorePicker, WeightedRandomPicker
from epp.scheduling.plugins.prefix_scorer import PrefixCacheScorer
from epp.scheduling.plugins.profile_handlers import PDProfileHandler, SingleProfileHandler
from epp.scheduling.plugins.queue_scorer import QueueScorer
from epp.scheduling.registry import PLUGINS, lookup
from epp.scheduling.request import InferenceRequest

UPSTREAM = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: []
saturationDetector:
  queueDepthThreshold: 5
plugins:
- type: single-profile-handler
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters:
    hashBlockSize: 64
    maxPrefixBlocksToMatch: 256
    lruCapacityPerServer: 31250
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 1
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
"""


def test_default_config_builds_pd_scheduler() -> None:
    s = build_scheduler(None)
    assert isinstance(s.handler, PDProfileHandler)
    assert set(s.profiles) == {"decode", "prefill"}
    decode = s.profiles["decode"]
    assert [type(f) for f in decode.filters][:2] == [HealthFilter, BusinessFilter]
    assert DecodeFilter in [type(f) for f in decode.filters]
    assert all(ws.weight > 0 for ws in decode.scorers)
    assert isinstance(decode.picker, MaxScorePicker)
    # the text and None build the same shape
    assert set(build_scheduler(DEFAULT_CONFIG).profiles) == set(s.profiles)


def test_upstream_config_loads_and_schedules() -> None:
    s = build_scheduler(UPSTREAM)
    assert isinstance(s.handler, SingleProfileHandler)
    prof = s.profiles["default"]
    assert [(type(ws.scorer), ws.weight) for ws in prof.scorers] == [
        (QueueScorer, 2.0),
        (KVCacheUtilizationScorer, 1.0),
        (PrefixCacheScorer, 3.0),
    ]
    assert isinstance(prof.picker, MaxScorePicker)
    busy, idle = Endpoint("127.0.0.1", 8000), Endpoint("127.0.0.2", 8000)
    busy.metrics.waiting = 10
    res = s.schedule(InferenceRequest(request_id="r", model="m", prompt=b"hi"), [busy, idle])
    assert res.target is idle


def test_aliases_and_noop_plugins_load() -> None:
    cfg = """
plugins:
- type: load-aware-scorer
- type: kv-cache-scorer
- type: prefill-header-handler
- type: weighted-random-picker
  parameters: {maxNumOfEndpoints: 2, seed: 1}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: load-aware-scorer
  - pluginRef: kv-cache-scorer
    weight: 0.5
  - pluginRef: prefill-header-handler
  - pluginRef: weighted-random-picker
"""
    s = build_scheduler(cfg)
    prof = s.profiles["default"]
    assert [ws.scorer.type_name for ws in prof.scorers] == [
        "inflight-scorer",
        "kv-cache-utilization-scorer",
    ]
    assert [ws.weight for ws in prof.scorers] == [1.0, 0.5]  # weight defaults to 1
    assert isinstance(prof.picker, WeightedRandomPicker) and prof.picker.count == 2


def test_no_profiles_means_one_default_profile_with_every_plugin() -> None:
    s = build_scheduler("plugins:\n- type: queue-scorer\n- type: decode-filter\n")
    assert list(s.profiles) == ["default"]
    prof = s.profiles["default"]
    assert len(prof.filters) == 1 and len(prof.scorers) == 1
    assert isinstance(prof.picker, MaxScorePicker)  # picker defaults to max-score
    assert isinstance(s.handler, SingleProfileHandler)


def test_empty_config_builds() -> None:
    s = build_scheduler("")
    ep = Endpoint("127.0.0.1", 8000)
    assert s.schedule(InferenceRequest(request_id="r", model="m"), [ep]).target is ep


def test_unknown_plugin_type_lists_known_types() -> None:
    with pytest.raises(ConfigError) as ei:
        build_scheduler("plugins:\n- type: magic-scorer\n")
    msg = str(ei.value)
    assert "magic-scorer" in msg
    for known in ("queue-scorer", "prefix-cache-scorer", "max-score-picker"):
        assert known in msg
    with pytest.raises(KeyError):
        lookup("magic-scorer")
    assert lookup("prefill-header-handler") is None
    assert lookup("queue-scorer") is PLUGINS["queue-scorer"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("plugins:\n- type: queue-scorer\n- type: queue-scorer\n", "defined twice"),
        (
            "plugins:\n- {type: queue-scorer, name: q}\n- {type: kv-cache-scorer, name: q}\n",
            "defined twice",
        ),
        (
            """
plugins: [{type: queue-scorer}]
schedulingProfiles:
- {name: a, plugins: [{pluginRef: queue-scorer}]}
- {name: a, plugins: [{pluginRef: queue-scorer}]}
""",
            "defined twice",
        ),
        (
            """
plugins: [{type: queue-scorer}]
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer, weight: -1}]
""",
            "negative weight",
        ),
        (
            """
plugins: [{type: queue-scorer}]
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer, weight: heavy}]
""",
            "weight",
        ),
        (
            """
plugins: [{type: max-score-picker}, {type: weighted-random-picker}]
schedulingProfiles:
- name: default
  plugins: [{pluginRef: max-score-picker}, {pluginRef: weighted-random-picker}]
""",
            "more than one picker",
        ),
        (
            """
plugins: [{type: queue-scorer}]
schedulingProfiles:
- name: default
  plugins: [{pluginRef: nope}]
""",
            "unknown plugin 'nope'",
        ),
        (
            "plugins: [{type: single-profile-handler}, {type: pd-profile-handler}]\n",
            "more than one profile handler",
        ),
        (
            """
plugins: [{type: queue-scorer}]
schedulingProfiles:
- {name: a, plugins: [{pluginRef: queue-scorer}]}
- {name: b, plugins: [{pluginRef: queue-scorer}]}
""",
            "no profile handler",
        ),
        (
            """
plugins: [{type: queue-scorer}, {type: pd-profile-handler}]
schedulingProfiles:
- {name: main, plugins: [{pluginRef: queue-scorer}]}
""",
            "decode",
        ),
        ("plugins:\n- {type: queue-scorer, color: red}\n", "invalid"),
        ("plugins: [{name: x}]\n", "invalid"),
        ("- just\n- a list\n", "mapping"),
        ("plugins: [unclosed\n", "YAML"),
    ],
)
def test_bad_configs_raise_config_error(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        build_scheduler(text)


def test_pd_profiles_without_handler_get_pd_handler() -> None:
    cfg = """
plugins: [{type: prefill-filter}, {type: decode-filter}]
schedulingProfiles:
- {name: prefill, plugins: [{pluginRef: prefill-filter}]}
- {name: decode, plugins: [{pluginRef: decode-filter}]}
"""
    assert isinstance(build_scheduler(cfg).handler, PDProfileHandler)


def test_parse_config_keeps_unknown_top_level_sections() -> None:
    cfg = parse_config(UPSTREAM)
    assert len(cfg.plugins) == 5
    assert cfg.model_extra is not None and "saturationDetector" in cfg.model_extra
