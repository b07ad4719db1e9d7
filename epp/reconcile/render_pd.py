"""Prefill/decode wiring of a ModelPool with a prefill role. Pure functions, no I/O.

* Decode pods get the P/D sidecar (`epp sidecar`, container `pd-sidecar`) in front of the
  engine: the pod's serving port (`spec.port`, the InferencePool target port and the
  Service port) is the sidecar's, the engine listens on `spec.sidecar.enginePort`; the
  engine keeps its /health readiness probe on its own port, the sidecar is ready
  (`/readyz`) when the engine is and its prefill allow-list is synced.
* The sidecar dials only prefill pods of the pool: it watches the InferencePool and its pods
  (read-only), as the ServiceAccount `<pool>-pd-sidecar` with a Role granting exactly that.
* Prefill pods serve on `spec.port` directly (the EPP names them in
  `x-prefiller-host-port`).
* Engines get their KV-transfer settings: vLLM `--kv-transfer-config` NixlConnector (in
  `engines.py`) and the NIXL side channel on the pod IP; SGLang `--disaggregation-mode`.

The base pod spec built here is the lowest layer: the template and the ModelPool's per-role
overrides (e.g. a `pd-sidecar` container entry with another image) merge on top of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from epp import IMAGE
from epp.api.modelpool import ModelPool

SIDECAR_CONTAINER = "pd-sidecar"
NIXL_SIDE_CHANNEL_PORT = 5557
RBAC_API = "rbac.authorization.k8s.io/v1"
POOL_GROUP = "inference.networking.k8s.io"


def enabled(pool: ModelPool) -> bool:
    return pool.spec.roles.prefill is not None


def engine_port(pool: ModelPool, role: str) -> int:
    """Where the engine of a `role` pod listens."""
    if enabled(pool) and role == "decode":
        return pool.spec.sidecar.engine_port
    return pool.spec.port


def connector(pool: ModelPool) -> str:
    return pool.spec.sidecar.connector or ("sglang" if pool.spec.engine == "sglang" else "nixlv2")


def service_account(pool: ModelPool) -> str:
    return f"{pool.name}-pd-sidecar"


def sidecar_container(pool: ModelPool) -> dict[str, Any]:
    s = pool.spec
    sc = s.sidecar
    args = [
        "--host", "0.0.0.0", "--port", str(s.port),
        # The pod IP rather than localhost: the same in a pod, and what works where
        # containers do not share a loopback (the test cluster's fake kubelet).
        "--engine-url", f"http://$(POD_IP):{sc.engine_port}",
        "--connector", connector(pool),
        "--prefill-timeout", f"{sc.prefill_timeout_seconds:g}",
        "--pool-name", pool.name,
        *sc.extra_args,
    ]  # fmt: skip
    container: dict[str, Any] = {
        "name": SIDECAR_CONTAINER,
        "image": sc.image or IMAGE,
        "command": ["epp", "sidecar"],
        "args": args,
        "env": [
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        "ports": [{"name": "http", "containerPort": s.port, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": s.port},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": s.port},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": {"requests": {"cpu": "200m", "memory": "128Mi"}},
    }
    resources = sc.resources.model_dump(by_alias=True)
    if resources.get("requests") or resources.get("limits"):
        container["resources"] = {k: dict(v) for k, v in resources.items() if v}
    return container


def pod_defaults(pool: ModelPool, role: str, pod_spec: dict[str, Any]) -> dict[str, Any]:
    """Add the P/D pieces to a role's base pod spec (engine container first)."""
    if not enabled(pool):
        return pod_spec
    engine = pod_spec["containers"][0]
    if pool.spec.engine == "vllm":
        env = list(engine.get("env") or [])
        env += [
            {"name": "VLLM_NIXL_SIDE_CHANNEL_HOST",
             "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "VLLM_NIXL_SIDE_CHANNEL_PORT", "value": str(NIXL_SIDE_CHANNEL_PORT)},
        ]  # fmt: skip
        engine["env"] = env
        engine["ports"] = [
            *engine.get("ports", []),
            {"name": "nixl", "containerPort": NIXL_SIDE_CHANNEL_PORT, "protocol": "TCP"},
        ]
    if role == "decode":
        pod_spec["containers"] = [*pod_spec["containers"], sidecar_container(pool)]
        pod_spec["serviceAccountName"] = service_account(pool)
    return pod_spec


def render(pool: ModelPool, meta: Callable[[str], dict[str, Any]]) -> list[dict[str, Any]]:
    """The sidecar's ServiceAccount and read-only Role + RoleBinding (P/D pools only)."""
    if not enabled(pool):
        return []
    name = service_account(pool)
    rules = [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [POOL_GROUP], "resources": ["inferencepools"],
         "verbs": ["get", "list", "watch"]},
    ]  # fmt: skip
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(name)},
        {"apiVersion": RBAC_API, "kind": "Role", "metadata": meta(name), "rules": rules},
        {
            "apiVersion": RBAC_API,
            "kind": "RoleBinding",
            "metadata": meta(name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [
                {"kind": "ServiceAccount", "name": name, "namespace": pool.namespace}
            ],
        },
    ]
