"""Async helpers for tests that run a KubeSource against the test cluster."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint
from hack.kube.cluster import Cluster

T = TypeVar("T")

# Any image works with the fake kubelet; on kind / real clusters (KUBECONFIG_E2E) pods must
# really run: pause has no probes, so it is Ready once started.
POD_IMAGE = os.environ.get("KUBE_TEST_IMAGE", "registry.k8s.io/pause:3.9")
READY_GATE = "epp.dev/ready"


async def until(cond: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.01,
                what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def until_async(cond: Callable[[], Awaitable[T | None]], timeout: float = 20.0,
                      what: str = "condition", interval: float = 0.1) -> T:
    """`until` for an async condition (an API read, an HTTP probe)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def kubectl(cluster: Cluster, *args: str, input: str | None = None) -> str:
    """kubectl off the event loop, so the source under test keeps processing events."""
    return await asyncio.to_thread(cluster.kubectl, *args, input=input)


def by_name(ds: Datastore) -> dict[str, list[Endpoint]]:
    out: dict[str, list[Endpoint]] = {}
    for ep in ds.endpoints():
        out.setdefault(ep.name, []).append(ep)
    return out


def pool_yaml(name: str, ns: str, selector: dict[str, str], ports: list[int]) -> str:
    labels = "".join(f"\n      {k}: {v}" for k, v in selector.items())
    port_list = ", ".join(f"{{number: {p}}}" for p in ports)
    return f"""
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {{name: {name}, namespace: {ns}}}
spec:
  selector:
    matchLabels:{labels}
  targetPorts: [{port_list}]
  endpointPickerRef: {{name: epp, port: {{number: 9002}}}}
"""


def pod_yaml(name: str, ns: str, labels: dict[str, str], gated: bool = False) -> str:
    """A pod; `gated` pods carry a readiness gate and stay not Ready until `open_gate`."""
    lab = "".join(f"\n    {k}: \"{v}\"" for k, v in labels.items())
    gate = f"\n  readinessGates: [{{conditionType: {READY_GATE}}}]" if gated else ""
    return f"""
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels:{lab}
spec:
  terminationGracePeriodSeconds: 1{gate}
  containers: [{{name: engine, image: {POD_IMAGE}}}]
"""


async def open_gate(cluster: Cluster, ns: str, pod: str, ready: bool = True) -> None:
    """Set the readiness-gate condition of a `gated` pod (the kubelet then updates Ready)."""
    cond = {"type": READY_GATE, "status": "True" if ready else "False"}
    patch = json.dumps({"status": {"conditions": [cond]}})
    await kubectl(cluster, "patch", "pod", pod, "-n", ns, "--subresource=status",
                  "--type=strategic", "-p", patch)


def deployment_yaml(name: str, ns: str, replicas: int, labels: dict[str, str]) -> str:
    lab = "".join(f"\n        {k}: \"{v}\"" for k, v in labels.items())
    sel = "".join(f"\n      {k}: \"{v}\"" for k, v in labels.items() if k == "app")
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  replicas: {replicas}
  selector:
    matchLabels:{sel}
  template:
    metadata:
      labels:{lab}
    spec:
      terminationGracePeriodSeconds: 1
      containers: [{{name: engine, image: {POD_IMAGE}}}]
"""


def model_yaml(name: str, ns: str, model: str, pool: str, criticality: str = "Standard",
               targets: list[tuple[str, int]] | None = None) -> str:
    tm = ""
    if targets:
        tm = "\n  targetModels: [" + ", ".join(
            f"{{name: {n}, weight: {w}}}" for n, w in targets) + "]"
    return f"""
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata: {{name: {name}, namespace: {ns}}}
spec:
  modelName: {model}
  criticality: {criticality}
  poolRef: {{name: {pool}}}{tm}
"""


def ensure_httproute_crd(cluster: Cluster) -> None:
    """Serve HTTPRoutes: a real Gateway API install if there is one, else the project's
    test-only structural CRD (manifests/crds/testing/), installed by `install_crds`."""
    if "httproutes" not in cluster.kubectl("get", "crd", "-o", "name"):
        cluster.install_crds()
