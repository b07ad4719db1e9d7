"""Generate the ModelPool CRD (`manifests/crds/modelpool.yaml`) from the pydantic model.

`python -m epp.reconcile.crdgen > manifests/crds/modelpool.yaml`; a unit test fails when the
checked-in CRD and the model drift apart. The schema is structural (every node typed, no
$ref, no type unions), so a 1.20 API server accepts it.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from epp.api.modelpool import GROUP, KIND, PLURAL, VERSION, ModelPoolSpec

_DROP = ("title", "$defs")


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        return _structural(defs[node["$ref"].rsplit("/", 1)[1]], defs)
    if "anyOf" in node:
        types = [t for t in node["anyOf"] if t.get("type") != "null"]
        nullable = len(types) != len(node["anyOf"])
        if {t.get("type") for t in types} == {"string", "integer"}:
            out: dict[str, Any] = {"x-kubernetes-int-or-string": True}
        else:
            out = _structural(types[0], defs)
        if nullable:
            out["nullable"] = True
        for k in ("description",):
            if k in node:
                out[k] = node[k]
        if node.get("default") is not None:
            out["default"] = node["default"]
        return out
    out = {}
    for k, v in node.items():
        if k in _DROP or (k == "additionalProperties" and v is False):
            continue
        if k == "default" and (v is None or v == {} or v == [] or v == ""):
            continue
        if k == "additionalProperties" and v is True:
            out["x-kubernetes-preserve-unknown-fields"] = True
            continue
        if k == "properties":
            out[k] = {name: _structural(sub, defs) for name, sub in v.items()}
        elif k in ("items", "additionalProperties") and isinstance(v, dict):
            out[k] = _structural(v, defs)
        elif k == "const":
            out["enum"] = [v]
        else:
            out[k] = v
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


_COUNTS = {
    "type": "object",
    "properties": {
        "replicas": {"type": "integer"},
        "readyReplicas": {"type": "integer"},
        "updatedReplicas": {"type": "integer"},
    },
}
STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "observedGeneration": {"type": "integer"},
        "roles": {"type": "object", "additionalProperties": _COUNTS},
        "businesses": {
            "type": "object",
            "description": "pods per business label value (all roles), `unassigned` included",
            "additionalProperties": {"type": "integer"},
        },
        "readyEndpoints": {"type": "integer"},
        "epp": {**_COUNTS, "description": "the pool's own EPP Deployment (spec.epp.managed)"},
        "conditions": {
            "type": "array",
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
            "items": {
                "type": "object",
                "required": ["type", "status"],
                "properties": {
                    "type": {"type": "string"},
                    "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                    "reason": {"type": "string"},
                    "message": {"type": "string"},
                    "lastTransitionTime": {"type": "string", "format": "date-time"},
                    "observedGeneration": {"type": "integer"},
                },
            },
        },
    },
}


def crd() -> dict[str, Any]:
    raw = ModelPoolSpec.model_json_schema(by_alias=True)
    spec_schema = _structural(raw, raw.get("$defs", {}))
    spec_schema.pop("description", None)
    col = "additionalPrinterColumns"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["mp"],
                "categories": ["epp"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                col: [
                    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
                    {"name": "Engine", "type": "string", "jsonPath": ".spec.engine"},
                    {"name": "Ready", "type": "string",
                     "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
                    {"name": "Decode", "type": "integer",
                     "jsonPath": ".status.roles.decode.readyReplicas"},
                    {"name": "Prefill", "type": "integer",
                     "jsonPath": ".status.roles.prefill.readyReplicas"},
                    {"name": "EPP", "type": "integer", "jsonPath": ".status.epp.readyReplicas"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A served model, its engine, roles and businesses; "
                                   "the reconciler renders and keeps its objects.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema,
                        "status": STATUS_SCHEMA,
                    },
                }},
            }],
        },
    }


def dump() -> str:
    header = "# Generated by `python -m epp.reconcile.crdgen`; do not edit by hand.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(dump())
