"""A ModelPool's own endpoint picker (`spec.epp.managed`, on by default). Pure functions.

Objects, all `<pool>-epp` in the pool's namespace (the Service may be renamed with
`spec.epp.serviceName`), owned by the ModelPool like the rest:
- ServiceAccount, and a Role + RoleBinding granting it read-only access to what `epp serve
  --pool-name` watches (pods, InferencePools, InferenceModels, InferenceObjectives);
- Deployment running `epp serve --pool-name <pool>` from the EPP image, the config from
  `spec.epp.config` (an EndpointPickerConfig, checked here like `epp serve` would, so a bad
  one is a ModelPool condition rather than a crash-looping pod);
- Service: ext_proc gRPC (`spec.epp.port`, appProtocol http2), gRPC health 9003, metrics 9090;
- PodDisruptionBudget: at most one EPP pod evicted at a time.

EPP pods carry `epp.dev/epp-for: <pool>`, never `epp.dev/pool`: the InferencePool selects
`epp.dev/pool`, and an EPP is not a model server.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from epp import IMAGE
from epp.api.modelpool import ModelPool

LABEL_EPP_FOR = "epp.dev/epp-for"
COMPONENT = ("app.kubernetes.io/component", "endpoint-picker")
ANNOTATION_CONFIG_HASH = "epp.dev/config-hash"
HEALTH_PORT = 9003
METRICS_PORT = 9090
SYNC_PORT = 9004  # state sync between the EPP's replicas (docs/replicas.md)
DRAIN_SECONDS = 30
DRAIN_DELAY_SECONDS = 3
CONTAINER = "epp"
# What `epp serve --pool-name` reads (epp/datalayer/kube_source.py), nothing more.
READ_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["inference.networking.x-k8s.io"],
     "resources": ["inferencemodels", "inferenceobjectives"], "verbs": ["get", "list", "watch"]},
    # replicas find each other in the EndpointSlices of the EPP's Service (--sync-service)
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
     "verbs": ["get", "list", "watch"]},
]
DEFAULT_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "250m", "memory": "256Mi"},
    "limits": {"memory": "1Gi"},
}


@dataclass(frozen=True)
class EppOptions:
    """What the reconciler (not the ModelPool) decides: the default image, the PDB API."""

    image: str = IMAGE
    pdb_api: str = "policy/v1"  # policy/v1beta1 below Kubernetes 1.21


def name(pool: ModelPool) -> str:
    return f"{pool.name}-epp"


def selector(pool: ModelPool) -> dict[str, str]:
    return {LABEL_EPP_FOR: pool.name}


def config_text(pool: ModelPool) -> str:
    """`spec.epp.config` as the YAML `epp serve --config-text` takes ("" = built-in)."""
    cfg = pool.spec.epp.config
    return yaml.safe_dump(cfg, sort_keys=False) if cfg else ""


def check_config(pool: ModelPool) -> None:
    """Raise ValueError if the EPP would refuse `spec.epp.config`."""
    text = config_text(pool)
    if not text:
        return
    from epp.requestcontrol.config import build_request_control  # only when a config is set

    try:
        build_request_control(text)
    except ValueError as e:
        raise ValueError(f"spec.epp.config: {' '.join(str(e).split())}") from None


def serve_args(pool: ModelPool) -> list[str]:
    e = pool.spec.epp
    args = [
        "serve",
        f"--pool-name={pool.name}",
        f"--pool-namespace={pool.namespace}",
        "--bind-address=0.0.0.0",
        f"--grpc-port={e.port}",
        f"--grpc-health-port={HEALTH_PORT}",
        f"--metrics-port={METRICS_PORT}",
        f"--business-header={e.business_header}",
        f"--drain-timeout={DRAIN_SECONDS}",
        f"--drain-delay={DRAIN_DELAY_SECONDS}",
        f"--sync-service={pool.epp_service()}",
        f"--sync-port={SYNC_PORT}",
    ]
    text = config_text(pool)
    if text:
        args.append(f"--config-text={text}")
    return args + list(e.extra_args)


MetaFor = Callable[[str], dict[str, Any]]


def _meta(obj_name: str, meta_for: MetaFor) -> dict[str, Any]:
    meta = meta_for(obj_name)
    meta["labels"] = {**meta["labels"], COMPONENT[0]: COMPONENT[1]}
    return meta


def _resources(pool: ModelPool) -> dict[str, Any]:
    spec = pool.spec.epp.resources
    out = {k: dict(v) for k, v in DEFAULT_RESOURCES.items()}
    for section in ("requests", "limits"):
        out[section].update({k: str(v) for k, v in getattr(spec, section).items()})
    return out


def deployment(pool: ModelPool, meta_for: MetaFor, opts: EppOptions) -> dict[str, Any]:
    e = pool.spec.epp
    probe = {"port": METRICS_PORT}
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": e.image or opts.image,
        "imagePullPolicy": "IfNotPresent",
        "args": serve_args(pool),
        "ports": [
            {"name": "grpc", "containerPort": e.port, "protocol": "TCP"},
            {"name": "grpc-health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "sync", "containerPort": SYNC_PORT, "protocol": "TCP"},
        ],
        "env": [  # replica identity for state sync
            {"name": n, "valueFrom": {"fieldRef": {"fieldPath": f}}}
            for n, f in (("POD_NAME", "metadata.name"), ("POD_IP", "status.podIP"),
                         ("POD_NAMESPACE", "metadata.namespace"))
        ],
        "readinessProbe": {"httpGet": {"path": "/readyz", **probe}, "periodSeconds": 2,
                           "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/healthz", **probe}, "periodSeconds": 10,
                          "failureThreshold": 3},
        "resources": _resources(pool),
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_labels = {**selector(pool), COMPONENT[0]: COMPONENT[1],
                  "app.kubernetes.io/name": "epp", "app.kubernetes.io/instance": pool.name}
    digest = hashlib.sha256(config_text(pool).encode()).hexdigest()[:16]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name(pool), meta_for),
        "spec": {
            "replicas": e.replicas,
            "selector": {"matchLabels": selector(pool)},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": pod_labels,
                             "annotations": {ANNOTATION_CONFIG_HASH: digest}},
                "spec": {
                    "serviceAccountName": name(pool),
                    "terminationGracePeriodSeconds": DRAIN_SECONDS + DRAIN_DELAY_SECONDS + 5,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 65532,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def service(pool: ModelPool, meta_for: MetaFor) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(pool.epp_service(), meta_for),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(pool),
            "ports": [
                {"name": "grpc-ext-proc", "port": pool.spec.epp.port, "targetPort": "grpc",
                 "protocol": "TCP", "appProtocol": "http2"},
                {"name": "grpc-health", "port": HEALTH_PORT, "targetPort": "grpc-health",
                 "protocol": "TCP"},
                {"name": "http-metrics", "port": METRICS_PORT, "targetPort": "metrics",
                 "protocol": "TCP"},
                {"name": "sync", "port": SYNC_PORT, "targetPort": "sync", "protocol": "TCP",
                 "appProtocol": "http2"},
            ],
        },
    }


def render(
    pool: ModelPool, meta_for: MetaFor, opts: EppOptions | None = None
) -> list[dict[str, Any]]:
    """The EPP's objects in apply order; [] when `spec.epp.managed` is off.
    `meta_for(name)` gives the pool's standard metadata (labels, ownerReferences)."""
    if not pool.spec.epp.managed:
        return []
    opts = opts or EppOptions()
    check_config(pool)
    n = name(pool)
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(n, meta_for)}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": _meta(n, meta_for), "rules": copy.deepcopy(READ_RULES)}
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(n, meta_for),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": n},
        "subjects": [{"kind": "ServiceAccount", "name": n, "namespace": pool.namespace}],
    }
    pdb = {
        "apiVersion": opts.pdb_api,
        "kind": "PodDisruptionBudget",
        "metadata": _meta(n, meta_for),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(pool)}},
    }
    return [sa, role, binding, service(pool, meta_for), deployment(pool, meta_for, opts), pdb]
