"""The pod -> endpoint rule, without a cluster (the API-server tests cover the plumbing)."""

from __future__ import annotations

from typing import Any

from epp.datalayer.kube_pods import pod_endpoints, pod_ready, slim_pod
from epp.datalayer.labels import LabelKeys


def _pod(ip: str | None = "127.0.0.10", ready: str = "True", deleting: bool = False,
         phase: str = "Running", labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p", "namespace": "ns", "labels": labels or {}}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    status: dict[str, Any] = {"phase": phase, "conditions": [{"type": "Ready", "status": ready}]}
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "status": status}


def test_readiness_rule() -> None:
    assert pod_ready(_pod())
    assert not pod_ready(_pod(ip=None))
    assert not pod_ready(_pod(ready="False"))
    assert not pod_ready(_pod(deleting=True))
    assert not pod_ready({"metadata": {}, "status": {"podIP": "127.0.0.10"}})  # no condition


def test_one_endpoint_per_port_with_labels() -> None:
    labels = {"model": "llama", "business": "prod", "role": "prefill", "engine-type": "sglang"}
    eps = pod_endpoints(_pod(labels=labels), (8000, 8001))
    assert [e.key for e in eps] == ["127.0.0.10:8000", "127.0.0.10:8001"]
    assert all((e.model, e.business, e.role, e.engine, e.ready, e.name, e.namespace)
               == ("llama", "prod", "prefill", "sglang", True, "p", "ns") for e in eps)


def test_not_ready_pods_are_kept_but_ipless_and_finished_pods_are_not() -> None:
    (ep,) = pod_endpoints(_pod(ready="False"), (8000,))
    assert not ep.ready
    (ep,) = pod_endpoints(_pod(deleting=True), (8000,))
    assert not ep.ready
    assert pod_endpoints(_pod(ip=None), (8000,)) == []
    assert pod_endpoints(_pod(phase="Succeeded"), (8000,)) == []


def test_label_keys_and_llmd_role() -> None:
    (ep,) = pod_endpoints(_pod(labels={"llm-d.ai/role": "prefill-decode"}), (8000,))
    assert (ep.role, ep.business) == ("both", "unassigned")
    keys = LabelKeys(business="tenant", model="app.example/model")
    labels = {"tenant": "t1", "business": "ignored", "app.example/model": "m"}
    (ep,) = pod_endpoints(_pod(labels=labels), (8000,), keys)
    assert (ep.business, ep.model) == ("t1", "m")


def test_slim_pod_keeps_what_endpoints_need() -> None:
    pod = _pod(labels={"model": "m", "business": "b"}, deleting=True)
    pod["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    pod["spec"] = {"containers": [{"name": "c"}]}
    slim = slim_pod(pod)
    assert "managedFields" not in slim["metadata"] and "spec" not in slim
    assert [e.identity() for e in pod_endpoints(slim, (1, 2))] == [
        e.identity() for e in pod_endpoints(pod, (1, 2))]
