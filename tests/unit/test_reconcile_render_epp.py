"""The pool's own EPP as the reconciler renders it (epp/reconcile/render_epp.py): the objects,
their wiring (ports, selectors, names), args that `epp serve` itself accepts, the config
check, and that EPP pods are never mistaken for model servers."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

import epp
from epp.api.modelpool import ModelPool
from epp.cli import make_parser
from epp.reconcile import render, render_epp
from tests.unit.test_reconcile_render import by_kind, pool_doc

CONFIG = {
    "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
    "kind": "EndpointPickerConfig",
    "plugins": [{"type": "queue-scorer"}, {"type": "max-score-picker"}],
    "schedulingProfiles": [{"name": "default", "plugins": [
        {"pluginRef": "queue-scorer"}, {"pluginRef": "max-score-picker"}]}],
}


def objs_of(**epp_spec: Any) -> tuple[ModelPool, list[dict[str, Any]]]:
    pool = ModelPool.from_dict(pool_doc(epp=epp_spec) if epp_spec else pool_doc())
    return pool, render.render(pool)


def epp_objs(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["metadata"]["labels"].get("app.kubernetes.io/component")
            == "endpoint-picker"]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_managed_by_default_six_owned_objects() -> None:
    _, objs = objs_of()
    mine = epp_objs(objs)
    assert [(o["kind"], o["metadata"]["name"]) for o in mine] == [
        ("ServiceAccount", "p-epp"), ("Role", "p-epp"), ("RoleBinding", "p-epp"),
        ("Service", "p-epp"), ("Deployment", "p-epp"), ("PodDisruptionBudget", "p-epp")]
    for o in mine:
        assert o["metadata"]["namespace"] == "ns"
        assert o["metadata"]["labels"]["epp.dev/pool"] == "p"  # pruned and watched with the pool
        assert o["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert {(k.api_version, k.kind) for k in render.OWNED_KINDS} >= {
        (o["apiVersion"], o["kind"]) for o in objs}


def test_wiring_ports_selectors_and_service_account() -> None:
    _, objs = objs_of(serviceName="gw-picker", port=9102)
    dep = next(o for o in by_kind(objs, "Deployment") if o["metadata"]["name"] == "p-epp")
    svc = next(o for o in by_kind(objs, "Service") if o["metadata"]["name"] == "gw-picker")
    ipool = by_kind(objs, "InferencePool")[0]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    # The Service and the PDB select the EPP pods; the InferencePool does not.
    assert matches(svc["spec"]["selector"], labels)
    assert matches(by_kind(objs, "PodDisruptionBudget")[0]["spec"]["selector"]["matchLabels"],
                   labels)
    assert matches(dep["spec"]["selector"]["matchLabels"], labels)
    assert not matches(ipool["spec"]["selector"]["matchLabels"], labels)
    assert "epp.dev/pool" not in labels
    # The InferencePool's endpointPickerRef reaches the ext_proc port.
    ref = ipool["spec"]["endpointPickerRef"]
    grpc = next(p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"])
    assert ref["name"] == "gw-picker" and grpc["appProtocol"] == "http2"
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[grpc["targetPort"]] == 9102
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {
        "grpc-ext-proc": 9102, "grpc-health": 9003, "http-metrics": 9090, "sync": 9004}
    # Active-active replicas find each other through this Service (docs/replicas.md).
    assert f"--sync-service={svc['metadata']['name']}" in container["args"]
    assert ports["sync"] == 9004
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9090}
    assert container["image"] == epp.IMAGE
    # Its ServiceAccount is bound to a read-only Role in the pool's namespace.
    sa = pod["spec"]["serviceAccountName"]
    binding = by_kind(objs, "RoleBinding")[0]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "ns"}]
    role = by_kind(objs, "Role")[0]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert verbs == {"get", "list", "watch"}


def test_args_are_accepted_by_epp_serve_and_carry_the_config() -> None:
    _, objs = objs_of(config=CONFIG, businessHeader="X-Tenant", extraArgs=["--log-level=debug"])
    dep = next(o for o in epp_objs(objs) if o["kind"] == "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "serve"
    parsed = make_parser("serve").parse_args(args[1:])
    assert (parsed.pool_name, parsed.pool_namespace, parsed.bind_address) == ("p", "ns", "0.0.0.0")
    assert (parsed.grpc_port, parsed.business_header, parsed.log_level) == (
        9002, "x-tenant", "debug")
    assert yaml.safe_load(parsed.config_text) == CONFIG
    # A config change rolls the pods (the hash is in the pod template).
    _, objs2 = objs_of(config={**CONFIG, "plugins": [*CONFIG["plugins"], {"type": "kv-cache-utilization-scorer"}]})
    h1, h2 = (next(o for o in epp_objs(x) if o["kind"] == "Deployment")["spec"]["template"]
              ["metadata"]["annotations"]["epp.dev/config-hash"] for x in (objs, objs2))
    assert h1 != h2
    _, default = objs_of()
    dep = next(o for o in epp_objs(default) if o["kind"] == "Deployment")
    assert not [a for a in dep["spec"]["template"]["spec"]["containers"][0]["args"]
                if a.startswith("--config-text")]


def test_a_config_the_epp_would_refuse_is_a_spec_error() -> None:
    bad = {**CONFIG, "plugins": [{"type": "no-such-scorer"}]}
    with pytest.raises(ValueError, match=r"spec\.epp\.config.*no-such-scorer"):
        objs_of(config=bad)


def test_unmanaged_renders_no_epp_and_points_at_the_named_service() -> None:
    _, objs = objs_of(managed=False, serviceName="my-epp")
    assert epp_objs(objs) == []
    assert by_kind(objs, "InferencePool")[0]["spec"]["endpointPickerRef"]["name"] == "my-epp"


def test_image_replicas_resources_and_pdb_api() -> None:
    pool = ModelPool.from_dict(pool_doc(epp={
        "image": "reg.example/epp:9", "replicas": 3,
        "resources": {"requests": {"cpu": 2}, "limits": {"memory": "4Gi"}}}))
    objs = render.render(pool, epp=render_epp.EppOptions(image="other:1", pdb_api="policy/v1beta1"))
    dep = next(o for o in epp_objs(objs) if o["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "reg.example/epp:9" and dep["spec"]["replicas"] == 3
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "256Mi"},
                              "limits": {"memory": "4Gi"}}
    assert by_kind(objs, "PodDisruptionBudget")[0]["apiVersion"] == "policy/v1beta1"
    objs = render.render(ModelPool.from_dict(pool_doc()),
                         epp=render_epp.EppOptions(image="other:1"))
    dep = next(o for o in epp_objs(objs) if o["kind"] == "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "other:1"


def test_pool_is_ready_only_once_its_epp_is() -> None:
    from epp.reconcile import status

    def dep(ready: int) -> dict[str, Any]:
        return {"metadata": {"generation": 1}, "spec": {"replicas": 1},
                "status": {"observedGeneration": 1, "replicas": 1, "readyReplicas": ready,
                           "updatedReplicas": 1}}

    def ready(epp_ready: int) -> tuple[dict[str, Any], dict[str, Any]]:
        obs = status.Observed(generation=1, desired={"decode": 1},
                              deployments={"decode": dep(1)}, epp=(1, dep(epp_ready)))
        st = status.compute(obs, {})
        return st, next(c for c in st["conditions"] if c["type"] == "Ready")

    st, cond = ready(0)
    assert cond["status"] == "False" and "epp 0/1 ready" in cond["message"]
    assert st["epp"] == {"replicas": 1, "readyReplicas": 0, "updatedReplicas": 1}
    st, cond = ready(1)
    assert cond["status"] == "True" and st["epp"]["readyReplicas"] == 1
    unmanaged = status.compute(status.Observed(generation=1, desired={}), {})
    assert "epp" not in unmanaged
