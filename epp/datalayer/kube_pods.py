"""Pod (as a JSON dict) -> endpoints. Pure functions, no I/O.

Readiness rule: the pod has an IP, no deletionTimestamp, and condition `Ready=True`.
A pod with an IP that fails the rule is still an endpoint, with `ready=False` (so its live
state survives a readiness blip); a pod without an IP has no endpoint.
"""

from __future__ import annotations

from typing import Any

from epp.datalayer.endpoint import Endpoint
from epp.datalayer.labels import DEFAULT_LABEL_KEYS, LabelKeys, endpoint_from_labels

Pod = dict[str, Any]


def pod_ip(pod: Pod) -> str | None:
    ip = (pod.get("status") or {}).get("podIP")
    return str(ip) if ip else None


def pod_ready(pod: Pod) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if not status.get("podIP"):
        return False
    for cond in status.get("conditions") or ():
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def slim_pod(pod: Pod) -> Pod:
    """Only what `pod_endpoints` reads (a cached pod without managedFields, spec, ...)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    return {
        "metadata": {k: meta[k] for k in ("name", "namespace", "labels", "deletionTimestamp")
                     if k in meta},
        "status": {k: status[k] for k in ("podIP", "phase", "conditions") if k in status},
    }


def pod_key(pod: Pod) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def pod_endpoints(
    pod: Pod, ports: tuple[int, ...], keys: LabelKeys = DEFAULT_LABEL_KEYS
) -> list[Endpoint]:
    """One endpoint per target port; none when the pod has no IP yet or is finished."""
    ip = pod_ip(pod)
    status = pod.get("status") or {}
    if ip is None or status.get("phase") in ("Succeeded", "Failed"):
        return []
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    ready = pod_ready(pod)
    return [
        endpoint_from_labels(ip, port, str(meta.get("name", "")), str(meta.get("namespace", "")),
                             labels, ready, keys)
        for port in ports
    ]
