"""The ModelPool reconciler against a real kube-apiserver (+ controller-manager, scheduler and
the fake kubelet of tests/kube/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml

from epp.reconcile.apply import ApplySettings
from epp.reconcile.assignment import list_pool_pods, pod_info
from epp.reconcile.cli_pool import distribution_patch, parse_distribution
from epp.reconcile.controller import Controller
from epp.reconcile.kube import Kube, path_for
from epp.reconcile.reconciler import pool_path, reconcile
from tests.kube.helpers import ensure_httproute_crd, until_async

SETTINGS = ApplySettings()


def pool_doc(ns: str, name: str = "mp", **spec: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "epp.dev/v1alpha1",
        "kind": "ModelPool",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": {"name": "sim-llama", "uri": "hf://example/sim-llama"},
            "engine": "sim",
            "roles": {"prefill": {"replicas": 1}, "decode": {"replicas": 3}},
            "businesses": [
                {"name": "production", "replicas": 2, "criticality": "Critical",
                 "match": {"headers": [{"name": "x-tenant", "value": "prod"}]}},
                {"name": "testing", "share": 1, "criticality": "Critical",
                 "match": {"headers": [{"name": "x-tenant", "value": "test"}]}},
            ],
            "gateway": {"parentRefs": [{"name": "gw"}]},
        },
    }
    doc["spec"].update(spec)
    return doc


@pytest.fixture(scope="module")
def cluster(kube_cluster: Any) -> Any:
    ensure_httproute_crd(kube_cluster)
    return kube_cluster


@pytest.fixture
async def kube(cluster: Any) -> AsyncIterator[Kube]:
    k = await Kube.connect(str(cluster.kubeconfig))
    yield k
    await k.close()


async def children(kube: Kube, ns: str, pool: str = "mp") -> dict[str, dict[str, Any]]:
    out = {}
    for api, plural in [("v1", "services"), ("apps/v1", "deployments"),
                        ("inference.networking.k8s.io/v1", "inferencepools"),
                        ("inference.networking.x-k8s.io/v1alpha2", "inferencemodels"),
                        ("gateway.networking.k8s.io/v1", "httproutes"),
                        ("v1", "serviceaccounts"), ("rbac.authorization.k8s.io/v1", "roles"),
                        ("rbac.authorization.k8s.io/v1", "rolebindings"),
                        ("policy/v1beta1", "poddisruptionbudgets")]:
        res = await kube.list_objects(path_for(api, plural, ns), f"epp.dev/pool={pool}")
        kind = str(res.get("kind", "")).removesuffix("List")
        for item in res.get("items") or []:
            out[f"{kind}/{item['metadata']['name']}"] = item
    return out


def condition(raw: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in (raw.get("status") or {}).get("conditions") or []
                if c["type"] == ctype)


async def test_create_owned_objects_then_second_pass_changes_nothing(
        kube: Kube, kube_ns: str) -> None:
    created = await kube.create(pool_path(kube_ns), pool_doc(kube_ns))
    uid = created["metadata"]["uid"]
    r1 = await reconcile(kube, kube_ns, "mp", SETTINGS)
    assert r1.ok, r1.message
    objs = await children(kube, kube_ns)
    assert sorted(objs) == sorted([
        "Service/mp-prefill", "Service/mp-decode", "Deployment/mp-prefill", "Deployment/mp-decode",
        "InferencePool/mp", "InferenceModel/mp", "HTTPRoute/mp-production", "HTTPRoute/mp-testing",
        # the pool's own EPP (1.20 serves PodDisruptionBudget as policy/v1beta1 only)
        "ServiceAccount/mp-epp", "Role/mp-epp", "RoleBinding/mp-epp", "Service/mp-epp",
        "Deployment/mp-epp", "PodDisruptionBudget/mp-epp",
        # the P/D sidecar's identity (a prefill role makes this a P/D pool)
        "ServiceAccount/mp-pd-sidecar", "Role/mp-pd-sidecar", "RoleBinding/mp-pd-sidecar"])
    for o in objs.values():
        ref = o["metadata"]["ownerReferences"][0]
        assert (ref["uid"], ref["controller"]) == (uid, True)
        assert any(m["manager"] == "epp-reconciler" and m["operation"] == "Apply"
                   for m in o["metadata"]["managedFields"])
    dep = objs["Deployment/mp-decode"]
    assert dep["spec"]["replicas"] == 3
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert (labels["model"], labels["business"], labels["role"]) == \
        ("sim-llama", "unassigned", "decode")
    engine = dep["spec"]["template"]["spec"]["containers"][0]
    assert engine["command"] == ["epp", "sim"]
    # P/D: the decode engine sits behind the sidecar on the internal port
    assert engine["args"] == ["--base-ip", "0.0.0.0", "--port", "8200", "--model", "sim-llama",
                             "--role", "decode"]
    assert dep["spec"]["template"]["spec"]["containers"][1]["name"] == "pd-sidecar"
    route = objs["HTTPRoute/mp-testing"]["spec"]["rules"][0]
    assert route["filters"][0]["requestHeaderModifier"]["set"] == \
        [{"name": "x-business", "value": "testing"}]
    assert objs["InferencePool/mp"]["spec"]["endpointPickerRef"]["name"] == "mp-epp"

    # pods come up (scheduler + fake kubelet); a pass assigns them: 2 production + 1 testing
    # decode pods, the single prefill pod goes to production (fixed replicas first)
    async def all_pods() -> list[dict[str, Any]] | None:
        pods = await list_pool_pods(kube, kube_ns, "mp")
        return pods if len(pods) == 4 else None
    await until_async(all_pods, what="4 pods")
    r2 = await reconcile(kube, kube_ns, "mp", SETTINGS)
    assert r2.ok and r1.moves + r2.moves == 4  # each pod relabelled once, never twice
    infos = [pod_info(p) for p in await list_pool_pods(kube, kube_ns, "mp")]
    got = sorted((p.role, p.business) for p in infos)
    assert got == [("decode", "production"), ("decode", "production"), ("decode", "testing"),
                   ("prefill", "production")]

    # Controllers write to our objects too (Deployment status, the 1.20 token controller's
    # ServiceAccount secrets), and a 1.20 API server stores a no-op apply's new managedFields
    # timestamp once the second has changed: compare contents, once nobody writes any more.
    def content(o: dict[str, Any]) -> dict[str, Any]:
        o = {k: v for k, v in o.items() if k != "status"}
        meta = {k: v for k, v in o["metadata"].items() if k != "resourceVersion"}
        meta["managedFields"] = [{k: v for k, v in m.items() if k != "time"}
                                 for m in meta.get("managedFields") or []]
        return {**o, "metadata": meta}

    async def contents() -> dict[str, dict[str, Any]]:
        return {k: content(v) for k, v in (await children(kube, kube_ns)).items()}

    last: list[dict[str, dict[str, Any]]] = []

    async def settled() -> dict[str, dict[str, Any]] | None:
        now = await contents()
        stable = bool(last) and last[-1] == now
        last.append(now)
        await asyncio.sleep(0.3)
        return now if stable else None
    before = await until_async(settled, what="owned objects settled")
    pool_before = await kube.get(pool_path(kube_ns, "mp"))
    r3 = await reconcile(kube, kube_ns, "mp", SETTINGS)
    assert r3.ok and r3.moves == 0 and not r3.pruned
    after = await contents()
    assert after == before  # idempotent: nothing changed
    pool_after = await kube.get(pool_path(kube_ns, "mp"))
    assert pool_after["metadata"]["generation"] == pool_before["metadata"]["generation"]


async def test_drift_corrected_foreign_applier_reported_not_stolen(
        kube: Kube, kube_ns: str) -> None:
    await kube.create(pool_path(kube_ns), pool_doc(kube_ns))
    assert (await reconcile(kube, kube_ns, "mp", SETTINGS)).ok
    dep_path = path_for("apps/v1", "deployments", kube_ns, "mp-decode")
    svc_path = path_for("v1", "services", kube_ns, "mp-prefill")
    route_path = path_for("gateway.networking.k8s.io/v1", "httproutes", kube_ns, "mp-testing")
    # imperative drift (Update operations): scaled by hand, a Service deleted, a route edited
    await kube.merge_patch(dep_path, {"spec": {"replicas": 7}}, "kubectl-edit")
    await kube.delete(svc_path)
    await kube.json_patch(route_path, [{"op": "replace", "value": "production", "path":
                          "/spec/rules/0/filters/0/requestHeaderModifier/set/0/value"}])
    r = await reconcile(kube, kube_ns, "mp", SETTINGS)
    assert r.ok, r.message
    assert (await kube.get(dep_path))["spec"]["replicas"] == 3
    assert await kube.get_or_none(svc_path) is not None
    route = await kube.get(route_path)
    assert route["spec"]["rules"][0]["filters"][0]["requestHeaderModifier"]["set"][0]["value"] \
        == "testing"

    # another applier takes spec.replicas with server-side apply: reported, not stolen
    await kube.apply(dep_path, {"apiVersion": "apps/v1", "kind": "Deployment",
                                "metadata": {"name": "mp-decode", "namespace": kube_ns},
                                "spec": {"replicas": 5}}, "gitops", force=True)
    r = await reconcile(kube, kube_ns, "mp", SETTINGS)
    assert not r.ok and r.reason == "ApplyConflict" and "gitops" in r.message
    assert (await kube.get(dep_path))["spec"]["replicas"] == 5
    raw = await kube.get(pool_path(kube_ns, "mp"))
    deg = condition(raw, "Degraded")
    assert (deg["status"], deg["reason"]) == ("True", "ApplyConflict")
    events = await kube.list_objects(path_for("v1", "events", kube_ns))
    reasons = [e["reason"] for e in events["items"]
               if e["involvedObject"].get("kind") == "ModelPool"]
    assert reasons == ["ApplyConflict"]
    r = await reconcile(kube, kube_ns, "mp", SETTINGS)  # same problem: no second event
    events = await kube.list_objects(path_for("v1", "events", kube_ns))
    assert len([e for e in events["items"] if e["involvedObject"].get("kind") == "ModelPool"]) == 1
    # configured to force: taken over
    r = await reconcile(kube, kube_ns, "mp", ApplySettings(force_conflicts=True))
    assert r.ok and (await kube.get(dep_path))["spec"]["replicas"] == 3
    assert condition(await kube.get(pool_path(kube_ns, "mp")), "Degraded")["status"] == "False"


async def test_bad_specs_give_condition_and_event(kube: Kube, kube_ns: str) -> None:
    await kube.create(pool_path(kube_ns), pool_doc(
        kube_ns, template={"configMapName": "nope"}))
    r = await reconcile(kube, kube_ns, "mp", SETTINGS)
    assert not r.ok and r.reason == "InvalidTemplate" and "nope" in r.message
    # the CRD cannot express "distinct route matches": the reconciler catches it
    bad = pool_doc(kube_ns, name="dup")
    for b in bad["spec"]["businesses"]:
        b["match"] = {}
    await kube.create(pool_path(kube_ns), bad)
    r = await reconcile(kube, kube_ns, "dup", SETTINGS)
    assert not r.ok and r.reason == "InvalidSpec" and "route match" in r.message
    raw = await kube.get(pool_path(kube_ns, "dup"))
    assert condition(raw, "Ready")["status"] == "False"
    assert raw["status"]["observedGeneration"] == raw["metadata"]["generation"]
    assert await children(kube, kube_ns, "dup") == {}
    # fixed spec -> recovers
    await kube.merge_patch(pool_path(kube_ns, "dup"), {"spec": {"businesses": [
        {"name": "production", "share": 1}]}})
    r = await reconcile(kube, kube_ns, "dup", SETTINGS)
    assert r.ok and "HTTPRoute/dup-production" in await children(kube, kube_ns, "dup")


async def test_prune_and_garbage_collection(kube: Kube, kube_ns: str) -> None:
    await kube.create(pool_path(kube_ns), pool_doc(kube_ns))
    assert (await reconcile(kube, kube_ns, "mp", SETTINGS)).ok
    raw = await kube.get(pool_path(kube_ns, "mp"))
    ops = [{"op": "remove", "path": "/spec/businesses/1"},
           {"op": "remove", "path": "/spec/roles/prefill"}]
    await kube.json_patch(pool_path(kube_ns, "mp"), ops)
    r = await reconcile(kube, kube_ns, "mp", SETTINGS)
    assert r.ok
    assert sorted(r.pruned) == ["Deployment/mp-prefill", "HTTPRoute/mp-testing",
                                "Role/mp-pd-sidecar", "RoleBinding/mp-pd-sidecar",
                                "Service/mp-prefill", "ServiceAccount/mp-pd-sidecar"]
    assert "HTTPRoute/mp-testing" not in await children(kube, kube_ns)
    assert raw["metadata"]["uid"]
    await kube.delete(pool_path(kube_ns, "mp"))

    async def gone() -> bool:
        return not await children(kube, kube_ns)
    await until_async(gone, timeout=40, what="children garbage-collected")


async def test_controller_status_readiness_distribute_and_churn(
        kube: Kube, kube_ns: str) -> None:
    ctl = Controller(kube, kube_ns, SETTINGS, resync=5.0)
    stop = asyncio.Event()
    task = asyncio.create_task(ctl.run(stop))
    try:
        await kube.create(pool_path(kube_ns), pool_doc(kube_ns))

        async def ready_cond() -> bool:
            raw = await kube.get(pool_path(kube_ns, "mp"))
            conds = (raw.get("status") or {}).get("conditions")
            return bool(conds) and condition(raw, "Ready")["status"] == "True" and \
                raw["status"]["businesses"] == {"production": 3, "testing": 1}
        await until_async(ready_cond, what="pool Ready with its distribution")

        # readiness flips -> status follows
        pods = await list_pool_pods(kube, kube_ns, "mp")
        victim = next(p for p in pods if p["metadata"]["labels"]["role"] == "decode")
        vpath = path_for("v1", "pods", kube_ns, victim["metadata"]["name"])
        await kube.merge_patch(vpath, {"metadata": {"annotations": {
            "fake-kubelet.epp.dev/ready": "false"}}})

        async def not_ready() -> dict[str, Any] | None:
            raw = await kube.get(pool_path(kube_ns, "mp"))
            c = condition(raw, "Ready")
            return raw if c["status"] == "False" and "decode 2/3" in c["message"] else None
        raw = await until_async(not_ready, what="Ready=False")
        assert raw["status"]["roles"]["decode"]["readyReplicas"] == 2

        # distribute (what `epp pool distribute` does) while pods churn
        raw = await kube.get(pool_path(kube_ns, "mp"))
        await kube.json_patch(pool_path(kube_ns, "mp"), distribution_patch(
            raw, parse_distribution("production=1,testing=1")))
        await kube.merge_patch(path_for("apps/v1", "deployments", kube_ns, "mp-decode"),
                               {"spec": {"replicas": 5}}, "kubectl-scale")
        await kube.delete(vpath)

        async def converged() -> list[Any] | None:
            infos = [pod_info(p) for p in await list_pool_pods(kube, kube_ns, "mp")]
            live = [p for p in infos if not p.deleting]
            dec = sorted(p.business for p in live if p.role == "decode")
            pre = sorted(p.business for p in live if p.role == "prefill")
            # replicas drift corrected back to 3; 1 production, 1 testing, 1 unassigned
            ok = dec == ["production", "testing", "unassigned"] and pre == ["production"]
            return infos if ok and len(infos) == 4 else None
        await until_async(converged, timeout=30, what="distribution under churn")
        assert ctl.passes > 0 and all(r.ok for r in ctl.last.values())
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_render_matches_what_is_applied(cluster: Any, kube_ns: str) -> None:
    """`epp render` output is accepted by the API server as is (server-side dry run)."""
    from epp.reconcile.cli_render import render_documents
    from epp.reconcile.render_epp import EppOptions
    objs = render_documents([pool_doc(kube_ns)], epp=EppOptions(pdb_api="policy/v1beta1"))
    out = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-",
                          input=yaml.safe_dump_all(objs))
    assert out.count("serverside-applied") == len(objs) == 8 + 6 + 3  # + the EPP and P/D sidecar objects
