"""Async helpers for tests that run a KubeSource against the test cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint
from hack.kube.cluster import Cluster

T = TypeVar("T")


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


def pod_yaml(name: str, ns: str, labels: dict[str, str], ready: bool = True) -> str:
    lab = "".join(f"\n    {k}: \"{v}\"" for k, v in labels.items())
    ann = "" if ready else '\n  annotations: {fake-kubelet.epp.dev/ready: "false"}'
    return f"""
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}{ann}
  labels:{lab}
spec:
  terminationGracePeriodSeconds: 1
  containers: [{{name: engine, image: fake}}]
"""


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
      containers: [{{name: engine, image: fake}}]
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
