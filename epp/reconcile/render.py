"""ModelPool -> the Kubernetes objects it stands for. Pure functions, no I/O.

Objects (all namespaced in the pool's namespace, labelled `epp.dev/pool=<pool>`):
- one headless Service and one Deployment per role (`<pool>-prefill`, `<pool>-decode`);
  pods carry `model`, `business` (initially `unassigned`), `role`, `engine-type`;
  the Deployment selector is pool + role only, so relabelling `business` never orphans a pod;
- the `InferencePool` `<pool>` selecting every pod of the pool;
- one `InferenceModel` per served model name (with its businesses' criticality);
- one `HTTPRoute` `<pool>-<business>` per business, setting the business header;
- the pool's EPP (`render_epp.py`) unless `spec.epp.managed` is off.
- with a prefill role, the P/D sidecar in decode pods and its read-only RBAC (`render_pd.py`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from epp.api.modelpool import (
    API_VERSION,
    KIND,
    UNASSIGNED,
    ModelPool,
    RoleSpec,
    model_label_value,
)
from epp.reconcile import artifacts, engines, render_epp, render_pd, template
from epp.reconcile.merge import merge

LABEL_POOL = "epp.dev/pool"
LABEL_MODEL = "model"
LABEL_BUSINESS = "business"
LABEL_ROLE = "role"
LABEL_ENGINE = "engine-type"
ANNOTATION_MODEL = "epp.dev/model-name"
MANAGED_BY = ("app.kubernetes.io/managed-by", "epp-reconciler")

POOL_GROUP = "inference.networking.k8s.io"
POOL_API = f"{POOL_GROUP}/v1"
MODEL_API = "inference.networking.x-k8s.io/v1alpha2"
ROUTE_API = "gateway.networking.k8s.io/v1"


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str


# Every kind the reconciler may own, in apply order (prune walks these too).
OWNED_KINDS: tuple[Kind, ...] = (
    Kind("v1", "Service", "services"),
    Kind("apps/v1", "Deployment", "deployments"),
    Kind(POOL_API, "InferencePool", "inferencepools"),
    Kind(MODEL_API, "InferenceModel", "inferencemodels"),
    Kind(ROUTE_API, "HTTPRoute", "httproutes"),
    # the pool's EPP (render_epp.py) and the P/D sidecar (render_pd.py)
    Kind("v1", "ServiceAccount", "serviceaccounts"),
    Kind("rbac.authorization.k8s.io/v1", "Role", "roles"),
    Kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings"),
    Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    Kind("policy/v1beta1", "PodDisruptionBudget", "poddisruptionbudgets"),
)

DEFAULT_TEMPLATE: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "spec": {"template": {"spec": {"terminationGracePeriodSeconds": 30}}},
}


def pool_labels(pool: ModelPool) -> dict[str, str]:
    return {LABEL_POOL: pool.name, MANAGED_BY[0]: MANAGED_BY[1]}


def model_label(pool: ModelPool) -> str:
    return pool.spec.model.label or model_label_value(pool.spec.model.name)


def role_selector(pool: ModelPool, role: str) -> dict[str, str]:
    return {LABEL_POOL: pool.name, LABEL_ROLE: role}


def owner_reference(pool: ModelPool) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": pool.name,
        "uid": pool.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(pool: ModelPool, name: str, owner: bool, **extra_labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": pool.namespace,
        "labels": {**pool_labels(pool), **extra_labels},
    }
    if owner and pool.metadata.uid:
        meta["ownerReferences"] = [owner_reference(pool)]
    return meta


def template_values(pool: ModelPool, role: str, spec: RoleSpec) -> dict[str, str | int]:
    s = pool.spec
    art = artifacts.resolve(s.model.uri)
    return {
        "POOL_NAME": pool.name,
        "NAMESPACE": pool.namespace,
        "ROLE": role,
        "MODEL_NAME": s.model.name,
        "MODEL_LABEL": model_label(pool),
        "MODEL_URI": s.model.uri,
        "MODEL_PATH": art.model_path,
        "PORT": s.port,
        "ENGINE": s.engine,
        "IMAGE": s.image or engines.DEFAULT_IMAGES[s.engine],
        "TENSOR_PARALLEL": spec.parallelism.tensor,
        "DATA_PARALLEL": spec.parallelism.data,
    }


def _role_override(spec: RoleSpec) -> dict[str, Any]:
    """The ModelPool's per-role pod-spec fragment (empty values mean "keep")."""
    containers = [c.model_dump(by_alias=True, exclude_none=True) for c in spec.containers]
    resources = spec.resources.model_dump(by_alias=True)
    engine = next((c for c in containers if c["name"] == engines.ENGINE_CONTAINER), None)
    if engine is None:
        containers.insert(0, {"name": engines.ENGINE_CONTAINER, "resources": resources})
    else:
        engine["resources"] = merge(resources, engine.get("resources", {}))
    return {"nodeSelector": dict(spec.accelerator_selector), "containers": containers}


def _quantities_as_strings(pod_spec: dict[str, Any]) -> None:
    """Server-side apply wants resource quantities as strings (`2`, not 2)."""
    for key in ("containers", "initContainers"):
        for c in pod_spec.get(key) or []:
            for section in ("requests", "limits"):
                values = (c.get("resources") or {}).get(section)
                if values:
                    c["resources"][section] = {k: str(v) for k, v in values.items()}


def deployment(
    pool: ModelPool, role: str, spec: RoleSpec, base: dict[str, Any] | None, owner: bool = True
) -> dict[str, Any]:
    values = template_values(pool, role, spec)
    tpl = template.expand(copy.deepcopy(base or DEFAULT_TEMPLATE), values)
    tpl_spec: dict[str, Any] = tpl.get("spec") or {}
    tpl_pod: dict[str, Any] = tpl_spec.get("template") or {}
    art = artifacts.resolve(pool.spec.model.uri)

    # Layers, lowest first: engine defaults + artifact, base template, ModelPool role overrides.
    engine = engines.engine_container(pool, role, spec, art, render_pd.engine_port(pool, role))
    engine["volumeMounts"] = [art.mount]
    if art.env:
        engine["env"] = list(art.env)
    pod_spec: dict[str, Any] = {"containers": [engine], "volumes": [art.volume]}
    pod_spec = render_pd.pod_defaults(pool, role, pod_spec)
    pod_spec = merge(pod_spec, tpl_pod.get("spec") or {})
    pod_spec = merge(pod_spec, _role_override(spec))
    _quantities_as_strings(pod_spec)

    pod_labels = {
        **((tpl_pod.get("metadata") or {}).get("labels") or {}),
        LABEL_POOL: pool.name,
        LABEL_MODEL: model_label(pool),
        LABEL_BUSINESS: UNASSIGNED,
        LABEL_ROLE: role,
        LABEL_ENGINE: pool.spec.engine,
    }
    pod_annotations = {
        **((tpl_pod.get("metadata") or {}).get("annotations") or {}),
        ANNOTATION_MODEL: pool.spec.model.name,
    }
    dep_spec = {k: v for k, v in tpl_spec.items() if k not in ("template", "selector", "replicas")}
    dep_spec["selector"] = {"matchLabels": role_selector(pool, role)}
    if not pool.spec.decouple_scaling:
        dep_spec["replicas"] = spec.replicas
    dep_spec["template"] = {
        "metadata": {"labels": pod_labels, "annotations": pod_annotations},
        "spec": pod_spec,
    }
    meta = _meta(pool, f"{pool.name}-{role}", owner, **{LABEL_ROLE: role})
    tpl_meta = tpl.get("metadata") or {}
    meta["labels"] = {**(tpl_meta.get("labels") or {}), **meta["labels"]}
    if tpl_meta.get("annotations"):
        meta["annotations"] = dict(tpl_meta["annotations"])
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": dep_spec}


def service(pool: ModelPool, role: str, owner: bool = True) -> dict[str, Any]:
    port = pool.spec.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(pool, f"{pool.name}-{role}", owner, **{LABEL_ROLE: role}),
        "spec": {
            "clusterIP": "None",
            "selector": role_selector(pool, role),
            "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def inference_pool(pool: ModelPool, owner: bool = True) -> dict[str, Any]:
    e = pool.spec.epp
    return {
        "apiVersion": POOL_API,
        "kind": "InferencePool",
        "metadata": _meta(pool, pool.name, owner),
        "spec": {
            "selector": {"matchLabels": {LABEL_POOL: pool.name}},
            "targetPorts": [{"number": pool.spec.port}],
            "endpointPickerRef": {
                "group": "",
                "kind": "Service",
                "name": pool.epp_service(),
                "port": {"number": e.port},
                "failureMode": e.failure_mode,
            },
        },
    }


def inference_models(pool: ModelPool, owner: bool = True) -> list[dict[str, Any]]:
    """One InferenceModel per served model name (the spec guarantees one criticality each)."""
    served = pool.spec.model.name
    by_name: dict[str, tuple[str, str]] = {}  # modelName -> (object name, criticality)
    for b in pool.spec.businesses:
        name = b.model_name or served
        obj_name = pool.name if name == served else f"{pool.name}-{b.name}"
        by_name.setdefault(name, (obj_name, b.criticality))
    if not by_name:
        by_name[served] = (pool.name, "Standard")
    out = []
    for model_name, (obj_name, criticality) in by_name.items():
        spec: dict[str, Any] = {
            "modelName": model_name,
            "criticality": criticality,
            "poolRef": {"group": POOL_GROUP, "kind": "InferencePool", "name": pool.name},
        }
        if model_name != served:
            spec["targetModels"] = [{"name": served, "weight": 100}]
        out.append({
            "apiVersion": MODEL_API,
            "kind": "InferenceModel",
            "metadata": _meta(pool, obj_name, owner),
            "spec": spec,
        })
    return out


def http_routes(pool: ModelPool, owner: bool = True) -> list[dict[str, Any]]:
    out = []
    header = pool.spec.epp.business_header
    parents = [
        {k: v for k, v in p.model_dump(by_alias=True).items() if v}
        for p in pool.spec.gateway.parent_refs
    ]
    for b in pool.spec.businesses:
        match: dict[str, Any] = {"path": {"type": "PathPrefix", "value": b.match.path}}
        if b.match.headers:
            match["headers"] = [
                {"type": "Exact", "name": h.name, "value": h.value} for h in b.match.headers
            ]
        spec: dict[str, Any] = {
            "parentRefs": parents,
            "rules": [{
                "matches": [match],
                "filters": [{
                    "type": "RequestHeaderModifier",
                    "requestHeaderModifier": {"set": [{"name": header, "value": b.name}]},
                }],
                "backendRefs": [{"group": POOL_GROUP, "kind": "InferencePool", "name": pool.name}],
            }],
        }
        if b.match.hostnames:
            spec["hostnames"] = list(b.match.hostnames)
        meta = _meta(pool, f"{pool.name}-{b.name}", owner, **{LABEL_BUSINESS: b.name})
        out.append({"apiVersion": ROUTE_API, "kind": "HTTPRoute", "metadata": meta, "spec": spec})
    return out


def render(
    pool: ModelPool,
    base_template: dict[str, Any] | None = None,
    owner: bool = True,
    epp: render_epp.EppOptions | None = None,
) -> list[dict[str, Any]]:
    """Every object the pool stands for, in apply order. Raises ValueError on a bad spec."""
    objs: list[dict[str, Any]] = render_epp.render(pool, lambda n: _meta(pool, n, owner), epp)
    objs += render_pd.render(pool, lambda n: _meta(pool, n, owner))
    roles = pool.spec.roles.items()
    objs += [service(pool, role, owner) for role, _ in roles]
    objs += [deployment(pool, role, spec, base_template, owner) for role, spec in roles]
    objs.append(inference_pool(pool, owner))
    objs += inference_models(pool, owner)
    objs += http_routes(pool, owner)
    return objs


def object_key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return (obj["apiVersion"], obj["kind"], obj["metadata"]["name"])
