"""The EPP's ServiceAccount (manifests/rbac) may read what the kube source watches, in its
own namespace, and nothing else; and that is enough for a full sync."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

from epp.datalayer.datastore import Datastore
from epp.datalayer.kube_source import KubeSource
from hack.kube.cluster import REPO, Cluster
from tests.kube.helpers import kubectl, pod_yaml, pool_yaml, until

VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
RESOURCES = (  # (group, resource, subresource)
    ("", "pods", ""), ("", "pods", "status"), ("", "pods", "exec"), ("", "pods", "log"),
    ("", "services", ""), ("", "endpoints", ""), ("", "secrets", ""), ("", "configmaps", ""),
    ("", "serviceaccounts", "token"), ("apps", "deployments", ""), ("coordination.k8s.io",
                                                                    "leases", ""),
    ("inference.networking.k8s.io", "inferencepools", ""),
    ("inference.networking.k8s.io", "inferencepools", "status"),
    ("inference.networking.x-k8s.io", "inferencemodels", ""),
    ("inference.networking.x-k8s.io", "inferenceobjectives", ""),
    ("epp.dev", "modelpools", ""), ("discovery.k8s.io", "endpointslices", ""),
)
pytestmark = pytest.mark.filterwarnings("ignore:Unverified HTTPS request")

EXPECTED = {
    (verb, group, resource, "")
    for verb in ("get", "list", "watch")
    for group, resource in (("", "pods"), ("discovery.k8s.io", "endpointslices"),
                            ("inference.networking.k8s.io", "inferencepools"),
                            ("inference.networking.x-k8s.io", "inferencemodels"),
                            ("inference.networking.x-k8s.io", "inferenceobjectives"))
}


@pytest.fixture
def rbac_ns(kube_cluster: Cluster, kube_ns: str) -> str:
    kube_cluster.kubectl("apply", "-n", kube_ns, "-f", str(REPO / "manifests" / "rbac"))
    return kube_ns


def _allowed(authz: client.AuthorizationV1Api, user: str, verb: str, group: str,
             resource: str, sub: str, namespace: str | None) -> bool:
    review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
        user=user, groups=["system:serviceaccounts", "system:authenticated"],
        resource_attributes=client.V1ResourceAttributes(
            verb=verb, group=group, resource=resource, subresource=sub or None,
            namespace=namespace)))
    status = authz.create_subject_access_review(review).status
    return bool(status is not None and status.allowed)


def test_service_account_is_read_only_and_namespaced(kube_cluster: Cluster,
                                                     rbac_ns: str) -> None:
    api = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(kube_cluster.kubeconfig))
    try:
        authz = client.AuthorizationV1Api(api)
        user = f"system:serviceaccount:{rbac_ns}:epp"
        granted = {
            (verb, group, resource, sub)
            for verb, (group, resource, sub) in itertools.product(VERBS, RESOURCES)
            if _allowed(authz, user, verb, group, resource, sub, rbac_ns)
        }
        assert granted == EXPECTED
        # Nothing outside its namespace, nothing cluster-wide.
        assert not _allowed(authz, user, "list", "", "pods", "", "default")
        assert not _allowed(authz, user, "list", "", "pods", "", None)
        assert not _allowed(authz, user, "get", "", "nodes", "", None)
        # Another namespace's ServiceAccount of the same name gets nothing here.
        assert not _allowed(authz, "system:serviceaccount:default:epp", "list", "", "pods", "",
                            rbac_ns)
    finally:
        api.close()


async def _sa_kubeconfig(cluster: Cluster, ns: str, path: Path) -> Path:
    token = (await kubectl(cluster, "create", "token", "epp", "-n", ns)).strip()
    doc = yaml.safe_load(cluster.kubeconfig.read_text())
    doc["users"] = [{"name": doc["contexts"][0]["context"]["user"], "user": {"token": token}}]
    path.write_text(yaml.safe_dump(doc))
    return path


async def test_source_syncs_with_only_the_service_account_token(
    kube_cluster: Cluster, rbac_ns: str, tmp_path: Path
) -> None:
    await kubectl(kube_cluster, "apply", "-f", "-",
                  input=pool_yaml("pool", rbac_ns, {"app": "sim"}, [8000])
                  + "---" + pod_yaml("a", rbac_ns, {"app": "sim", "business": "prod"}))
    sa_kubeconfig = await _sa_kubeconfig(kube_cluster, rbac_ns, tmp_path / "kubeconfig")

    ds = Datastore()
    src = KubeSource(ds, "pool", rbac_ns, kubeconfig=str(sa_kubeconfig))
    await src.start()
    try:
        assert await ds.wait_synced(15)
        await until(lambda: [e for e in ds.endpoints() if e.ready and e.business == "prod"],
                    what="endpoint through the SA's eyes")
        await asyncio.sleep(0.3)
        assert all(s.errors == 0 for s in src.stats().values()), src.stats()
    finally:
        await src.stop()


async def test_source_syncs_without_access_to_optional_model_resources(
    kube_cluster: Cluster, rbac_ns: str, tmp_path: Path
) -> None:
    """An older RBAC that grants no InferenceModel/InferenceObjective access still gets a
    working (ready) EPP: those collections count as empty."""
    role = yaml.safe_load((REPO / "manifests/rbac/epp-rbac.yaml").read_text().split("---")[1])
    role["rules"] = [r for r in role["rules"] if "inferencemodels" not in r["resources"]]
    await kubectl(kube_cluster, "apply", "-n", rbac_ns, "-f", "-", input=yaml.safe_dump(role))
    await kubectl(kube_cluster, "apply", "-f", "-",
                  input=pool_yaml("pool", rbac_ns, {"app": "sim"}, [8000])
                  + "---" + pod_yaml("a", rbac_ns, {"app": "sim"}))
    sa_kubeconfig = await _sa_kubeconfig(kube_cluster, rbac_ns, tmp_path / "kubeconfig")
    ds = Datastore()
    src = KubeSource(ds, "pool", rbac_ns, kubeconfig=str(sa_kubeconfig))
    await src.start()
    try:
        assert await ds.wait_synced(15)
        await until(lambda: ds.endpoints(), what="endpoint")
        assert src.reflectors["inferencemodels"].absent
        assert not src.reflectors["pods"].absent
    finally:
        await src.stop()
