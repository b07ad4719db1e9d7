"""The test cluster itself: scheduling, fake kubelet status, deletions, CRDs."""

from __future__ import annotations

import json
from typing import Any

from hack.kube.cluster import Cluster
from tests.kube.conftest import wait_for
from tests.kube.helpers import POD_IMAGE

DEPLOY = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: %(ns)s}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: c, image: %(image)s}]
"""


def _pods(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    return list(json.loads(cluster.kubectl("get", "pods", "-n", ns, "-o", "json"))["items"])


def _ready(pod: dict[str, Any]) -> bool:
    conds = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
    return bool(pod["status"].get("podIP")) and conds.get("Ready") == "True"


def test_deployment_pods_become_ready_with_distinct_loopback_ips(
    kube_cluster: Cluster, kube_ns: str
) -> None:
    kube_cluster.apply(DEPLOY % {"ns": kube_ns, "image": POD_IMAGE})
    def three_ready() -> list[dict[str, Any]] | None:
        pods = _pods(kube_cluster, kube_ns)
        return pods if len(pods) == 3 and all(_ready(p) for p in pods) else None

    pods = wait_for(three_ready, timeout=30, what="3 ready pods")
    ips = [p["status"]["podIP"] for p in pods]
    assert len(set(ips)) == 3
    if kube_cluster.managed:
        assert all(ip.startswith("127.0.") for ip in ips)
    # Scale down: the terminating pod is finished by the kubelet and disappears.
    kube_cluster.kubectl("scale", "deployment/web", "-n", kube_ns, "--replicas=1")
    wait_for(lambda: len(_pods(kube_cluster, kube_ns)) == 1, timeout=30, what="scale down")


def test_ready_annotation_flips_readiness(managed_cluster: Cluster, kube_ns: str) -> None:
    kube_cluster = managed_cluster
    kube_cluster.kubectl("run", "p", "-n", kube_ns, f"--image={POD_IMAGE}", "--restart=Never")
    wait_for(lambda: _ready(_pods(kube_cluster, kube_ns)[0]), timeout=20, what="ready")
    kube_cluster.kubectl("annotate", "pod/p", "-n", kube_ns, "fake-kubelet.epp.dev/ready=false")
    wait_for(lambda: not _ready(_pods(kube_cluster, kube_ns)[0]), timeout=10, what="not ready")


def test_crds_installed(kube_cluster: Cluster) -> None:
    out = kube_cluster.kubectl("get", "crd", "-o", "name")
    for name in ("inferencepools.inference.networking.k8s.io",
                 "inferencemodels.inference.networking.x-k8s.io",
                 "inferenceobjectives.inference.networking.x-k8s.io"):
        assert f"customresourcedefinition.apiextensions.k8s.io/{name}" in out
