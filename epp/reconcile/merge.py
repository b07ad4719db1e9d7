"""Strategic merge of Kubernetes object fragments, the ModelPool way.

`merge(base, override)` returns a new object where:
- mappings merge key by key (so `resources.limits` merge per resource name);
- lists of named things (containers, env, ports, volumes, volumeMounts, ...) merge item by
  item matched on their key (`name`; `containerPort` for unnamed ports), new items appended;
- any other list, and any scalar, is replaced by the override;
- an *empty* override value (None, "", [], {}) means "not overridden" and keeps the base;
  an env var with an empty value and no valueFrom does not override either.
Neither argument is modified.
"""

from __future__ import annotations

import copy
from typing import Any

# list field name -> key its items are matched on
KEYED_LISTS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "envFrom": "prefix",
    "ports": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
}


def is_empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _item_key(item: Any, key: str) -> Any:
    if not isinstance(item, dict):
        return None
    if key == "name" and "name" not in item and "containerPort" in item:
        return ("port", item["containerPort"])  # unnamed container ports
    return item.get(key)


def _empty_env(item: Any) -> bool:
    return isinstance(item, dict) and is_empty(item.get("value")) and "valueFrom" not in item


def merge_list(field: str, base: list[Any], override: list[Any]) -> list[Any]:
    key = KEYED_LISTS.get(field)
    if key is None:
        return copy.deepcopy(override)
    out = copy.deepcopy(base)
    index = {_item_key(item, key): i for i, item in enumerate(out)}
    for item in override:
        if field == "env" and _empty_env(item):
            continue
        k = _item_key(item, key)
        if k is not None and k in index:
            out[index[k]] = merge(out[index[k]], item)
        else:
            index[k] = len(out)
            out.append(merge({}, item) if isinstance(item, dict) else copy.deepcopy(item))
    return out


def merge(base: Any, override: Any, field: str = "") -> Any:
    if is_empty(override):
        return copy.deepcopy(base)
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for k, v in override.items():
            if is_empty(v):
                continue
            out[k] = merge(out[k], v, k) if k in out else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(override, list):
        return merge_list(field, base, override)
    return copy.deepcopy(override)
