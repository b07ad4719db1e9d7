"""The reconciler's RBAC (manifests/reconciler/): the ServiceAccount may do exactly what
`epp reconcile` calls and nothing more, and that is enough for the controller to converge a
pool (create, template ConfigMap, event, distribute, status, prune) with only its token.
The whole folder also passes a server-side dry run."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config

from epp.reconcile.apply import ApplySettings
from epp.reconcile.assignment import list_pool_pods, pod_info
from epp.reconcile.controller import Controller
from epp.reconcile.kube import Kube, path_for
from epp.reconcile.reconciler import pool_path
from hack.kube.cluster import REPO, Cluster, kubectl_path
from tests.kube.helpers import ensure_httproute_crd, until_async

MANIFESTS = REPO / "manifests" / "reconciler"
SA_NS = "epp-system"
SA = f"system:serviceaccount:{SA_NS}:epp-reconciler"
SA_GROUPS = ["system:serviceaccounts", f"system:serviceaccounts:{SA_NS}", "system:authenticated"]


VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
OWNED = (("", "services"), ("apps", "deployments"),
         ("inference.networking.k8s.io", "inferencepools"),
         ("inference.networking.x-k8s.io", "inferencemodels"),
         ("gateway.networking.k8s.io", "httproutes"),
         # the pool's own EPP and the P/D sidecar (render_epp.py, render_pd.py)
         ("", "serviceaccounts"), ("rbac.authorization.k8s.io", "roles"),
         ("rbac.authorization.k8s.io", "rolebindings"), ("policy", "poddisruptionbudgets"))
RESOURCES = (  # (group, resource, subresource) probed with every verb
    *((g, r, "") for g, r in OWNED),
    ("epp.dev", "modelpools", ""), ("epp.dev", "modelpools", "status"),
    ("epp.dev", "modelpools", "finalizers"),
    ("", "pods", ""), ("", "pods", "status"), ("", "pods", "exec"), ("", "pods", "eviction"),
    ("", "configmaps", ""), ("", "events", ""), ("", "secrets", ""), ("", "namespaces", ""),
    ("", "serviceaccounts", "token"), ("apps", "replicasets", ""),
    ("inference.networking.k8s.io", "inferencepools", "status"),
    ("inference.networking.x-k8s.io", "inferenceobjectives", ""),
    ("discovery.k8s.io", "endpointslices", ""),
    ("coordination.k8s.io", "leases", ""),
    ("rbac.authorization.k8s.io", "clusterroles", ""),
    ("rbac.authorization.k8s.io", "clusterrolebindings", ""),
)
EXPECTED = {
    *((v, g, r, "") for g, r in OWNED
      for v in ("get", "list", "watch", "create", "patch", "delete")),
    *((v, "epp.dev", "modelpools", "") for v in ("get", "list", "watch")),
    ("patch", "epp.dev", "modelpools", "status"),
    ("update", "epp.dev", "modelpools", "finalizers"),
    *((v, "", "pods", "") for v in ("get", "list", "watch", "patch")),
    ("get", "", "configmaps", ""),
    ("create", "", "events", ""),
    *((v, "inference.networking.x-k8s.io", "inferenceobjectives", "")
      for v in ("get", "list", "watch")),
    *((v, "discovery.k8s.io", "endpointslices", "") for v in ("get", "list", "watch")),
}


@pytest.fixture(scope="module")
def rbac_cluster(kube_cluster: Cluster) -> Iterator[Cluster]:
    """The test cluster with an HTTPRoute CRD and the reconciler's namespace + RBAC applied
    (removed again afterwards: the ClusterRoleBinding is cluster-wide)."""
    ensure_httproute_crd(kube_cluster)
    files = [str(MANIFESTS / "00-namespace.yaml"), str(MANIFESTS / "10-rbac.yaml")]
    kube_cluster.kubectl("apply", *itertools.chain.from_iterable(("-f", f) for f in files))
    yield kube_cluster
    kube_cluster.kubectl("delete", "--wait=false", "--ignore-not-found",
                         *itertools.chain.from_iterable(("-f", f) for f in files), check=False)


def _authz(cluster: Cluster) -> tuple[client.ApiClient, client.AuthorizationV1Api]:
    api = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(cluster.kubeconfig))
    return api, client.AuthorizationV1Api(api)


def _allowed(authz: client.AuthorizationV1Api, verb: str, group: str, resource: str,
             sub: str = "", namespace: str | None = "team-a", user: str = SA) -> bool:
    review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
        user=user, groups=SA_GROUPS,
        resource_attributes=client.V1ResourceAttributes(
            verb=verb, group=group, resource=resource, subresource=sub or None,
            namespace=namespace)))
    status = authz.create_subject_access_review(review).status
    return bool(status is not None and status.allowed)


def test_service_account_gets_exactly_what_the_reconciler_calls(rbac_cluster: Cluster) -> None:
    api, authz = _authz(rbac_cluster)
    try:
        granted = {
            (verb, group, resource, sub)
            for verb, (group, resource, sub) in itertools.product(VERBS, RESOURCES)
            if _allowed(authz, verb, group, resource, sub)
        }
        assert granted == EXPECTED, (sorted(granted - EXPECTED), sorted(EXPECTED - granted))
        # Cluster-wide list/watch (the controller watches every namespace).
        for group, resource in (*OWNED, ("epp.dev", "modelpools"), ("", "pods")):
            assert _allowed(authz, "watch", group, resource, namespace=None), resource
        # Things it must never do, anywhere.
        for verb, group, resource in (("delete", "", "namespaces"), ("create", "", "namespaces"),
                                      ("get", "", "secrets"), ("list", "", "secrets"),
                                      ("get", "", "nodes"), ("delete", "", "pods"),
                                      ("create", "", "pods"), ("list", "", "configmaps"),
                                      ("escalate", "rbac.authorization.k8s.io", "clusterroles"),
                                      ("bind", "rbac.authorization.k8s.io", "clusterroles")):
            assert not _allowed(authz, verb, group, resource, namespace=None), (verb, resource)
            assert not _allowed(authz, verb, group, resource, namespace=SA_NS), (verb, resource)
        # A ServiceAccount of the same name elsewhere gets nothing.
        assert not _allowed(authz, "list", "", "pods",
                            user="system:serviceaccount:default:epp-reconciler")
    finally:
        api.close()  # type: ignore[no-untyped-call]


def test_pool_operator_role_covers_epp_pool_commands_only(rbac_cluster: Cluster,
                                                         kube_ns: str) -> None:
    """`epp-pool-operator` bound in one namespace: what `epp pool status|assign|distribute`
    call there, nothing elsewhere."""
    rbac_cluster.kubectl("create", "rolebinding", "ops", "-n", kube_ns,
                         "--clusterrole=epp-pool-operator", "--user=alice")
    api, authz = _authz(rbac_cluster)
    try:
        granted = {
            (verb, group, resource, sub)
            for verb, (group, resource, sub) in itertools.product(VERBS, RESOURCES)
            if _allowed(authz, verb, group, resource, sub, namespace=kube_ns, user="alice")
        }
        assert granted == {*((v, "epp.dev", "modelpools", "") for v in ("get", "list", "patch")),
                           *((v, "", "pods", "") for v in ("get", "list", "patch"))}
        assert not _allowed(authz, "patch", "", "pods", namespace="default", user="alice")
    finally:
        api.close()  # type: ignore[no-untyped-call]


def test_impersonated_service_account_is_refused_secrets_and_namespace_deletion(
        rbac_cluster: Cluster, kube_ns: str) -> None:
    """The same answer from the real request path (the admin may impersonate)."""
    def as_sa(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [kubectl_path(), "--kubeconfig", str(rbac_cluster.kubeconfig), "--as", SA,
             *itertools.chain.from_iterable(("--as-group", g) for g in SA_GROUPS), *args],
            capture_output=True, text=True, timeout=30)

    assert as_sa("get", "pods", "-n", kube_ns).returncode == 0
    assert as_sa("get", "modelpools", "-A").returncode == 0
    for args in (("get", "secrets", "-n", kube_ns), ("delete", "namespace", kube_ns),
                 ("get", "configmaps", "-n", kube_ns)):  # get one yes, list no
        res = as_sa(*args)
        assert res.returncode != 0 and "forbidden" in res.stderr.lower(), (args, res.stderr)
    assert kube_ns in rbac_cluster.kubectl("get", "namespace", kube_ns, "-o", "name")


def test_manifests_pass_server_side_dry_run(rbac_cluster: Cluster) -> None:
    # A server-side dry run does not create the Namespace, so objects inside it need it to
    # exist already (rbac_cluster applied it); everything else is validated by the server.
    out = rbac_cluster.kubectl("apply", "--dry-run=server", "--server-side",
                               "--field-manager=rbac-test", "-k", str(MANIFESTS))
    for obj in ("namespace/epp-system", "serviceaccount/epp-reconciler",
                "clusterrole.rbac.authorization.k8s.io/epp-reconciler",
                "clusterrolebinding.rbac.authorization.k8s.io/epp-reconciler",
                "clusterrole.rbac.authorization.k8s.io/epp-pool-operator",
                "role.rbac.authorization.k8s.io/epp-reconciler-leader",
                "rolebinding.rbac.authorization.k8s.io/epp-reconciler-leader",
                "deployment.apps/epp-reconciler"):
        assert obj in out, out


def test_leader_election_lease_only_in_its_own_namespace(rbac_cluster: Cluster) -> None:
    api, authz = _authz(rbac_cluster)
    try:
        for verb in ("get", "create", "update"):
            assert _allowed(authz, verb, "coordination.k8s.io", "leases", namespace=SA_NS)
            assert not _allowed(authz, verb, "coordination.k8s.io", "leases")  # team-a
        assert not _allowed(authz, "delete", "coordination.k8s.io", "leases", namespace=SA_NS)
    finally:
        api.close()  # type: ignore[no-untyped-call]


# ---- a whole controller run with nothing but the ServiceAccount's token ------------------

TEMPLATE = """
apiVersion: apps/v1
kind: Deployment
spec:
  template:
    metadata:
      annotations: {example.com/pool: "${POOL_NAME}"}
    spec:
      terminationGracePeriodSeconds: 1
"""


def _pool(ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "epp.dev/v1alpha1", "kind": "ModelPool",
        "metadata": {"name": "mp", "namespace": ns},
        "spec": {
            "model": {"name": "sim-llama", "uri": "hf://example/sim-llama"},
            "engine": "sim",
            "template": {"configMapName": "base", "key": "deployment.yaml"},
            "roles": {"decode": {"replicas": 3}},
            "businesses": [
                {"name": "production", "replicas": 2, "criticality": "Critical",
                 "match": {"headers": [{"name": "x-tenant", "value": "prod"}]}},
                {"name": "testing", "share": 1, "criticality": "Critical",
                 "match": {"headers": [{"name": "x-tenant", "value": "test"}]}},
            ],
            "gateway": {"parentRefs": [{"name": "gw"}]},
        },
    }


def _sa_kubeconfig(cluster: Cluster, path: Path) -> Path:
    token = cluster.kubectl("create", "token", "epp-reconciler", "-n", SA_NS).strip()
    doc = yaml.safe_load(cluster.kubeconfig.read_text())
    doc["users"] = [{"name": doc["contexts"][0]["context"]["user"], "user": {"token": token}}]
    path.write_text(yaml.safe_dump(doc))
    return path


async def test_controller_converges_with_only_the_service_account_token(
        rbac_cluster: Cluster, kube_ns: str, tmp_path: Path) -> None:
    admin = await Kube.connect(str(rbac_cluster.kubeconfig))
    sa = await Kube.connect(str(_sa_kubeconfig(rbac_cluster, tmp_path / "sa.kubeconfig")))
    ctl = Controller(sa, settings=ApplySettings(), resync=1.0)
    stop = asyncio.Event()
    run = asyncio.create_task(ctl.run(stop))
    try:
        # 1. Template ConfigMap missing: Degraded/InvalidTemplate and an Event (events create).
        await admin.create(pool_path(kube_ns), _pool(kube_ns))

        async def reason() -> str | None:
            raw = await admin.get(pool_path(kube_ns, "mp"))
            conds = (raw.get("status") or {}).get("conditions") or []
            return next((c.get("reason") for c in conds if c["type"] == "Degraded"), None)

        assert await until_async(lambda: _eq(reason(), "InvalidTemplate"), what="InvalidTemplate")
        events = await admin.list_objects(path_for("v1", "events", kube_ns))
        assert any(e.get("reason") == "InvalidTemplate" for e in events["items"])

        # 2. Template appears (configmaps get): objects applied, pods distributed 2/1, Ready.
        await admin.create(path_for("v1", "configmaps", kube_ns), {
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "base"},
            "data": {"deployment.yaml": TEMPLATE}})

        async def distributed() -> dict[str, int] | None:
            infos = [pod_info(p) for p in await list_pool_pods(admin, kube_ns, "mp")]
            counts: dict[str, int] = {}
            for p in infos:
                counts[p.business] = counts.get(p.business, 0) + 1
            return counts if counts == {"production": 2, "testing": 1} else None

        await until_async(distributed, 30, "2 production + 1 testing pods")
        assert await until_async(lambda: _eq(reason(), "AsExpected"), what="Degraded=AsExpected")
        dep = await admin.get(path_for("apps/v1", "deployments", kube_ns, "mp-decode"))
        assert dep["spec"]["template"]["metadata"]["annotations"]["example.com/pool"] == "mp"
        for api, plural, name in (("inference.networking.k8s.io/v1", "inferencepools", "mp"),
                                  ("gateway.networking.k8s.io/v1", "httproutes", "mp-testing"),
                                  ("inference.networking.x-k8s.io/v1alpha2", "inferencemodels",
                                   "mp"), ("v1", "services", "mp-decode")):
            assert await admin.get_or_none(path_for(api, plural, kube_ns, name)), name

        # 3. A business dropped: its HTTPRoute is pruned (delete) and its pod moves back.
        await admin.json_patch(pool_path(kube_ns, "mp"), [
            {"op": "test", "path": "/spec/businesses/1/name", "value": "testing"},
            {"op": "remove", "path": "/spec/businesses/1"}])

        async def pruned() -> bool:
            gone = await admin.get_or_none(path_for("gateway.networking.k8s.io/v1",
                                                    "httproutes", kube_ns, "mp-testing"))
            infos = [pod_info(p) for p in await list_pool_pods(admin, kube_ns, "mp")]
            return gone is None and not any(p.business == "testing" for p in infos)

        await until_async(pruned, 20, "route pruned and testing pod released")
        # The controller watches cluster-wide; other tests' pools (some invalid on purpose)
        # may be there too: judge only this test's namespace.
        mine = {k: r for k, r in ctl.last.items() if k[0] == kube_ns}
        assert mine and all(r.ok for r in mine.values()), mine
    finally:
        stop.set()
        await run
        await sa.close()
        await admin.close()


async def _eq(value: Awaitable[str | None], want: str) -> bool:
    return await value == want
