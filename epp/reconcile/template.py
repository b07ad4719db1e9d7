"""The base Deployment template: where it comes from and how its variables expand.

A template is a Deployment manifest (YAML), usually kept in a ConfigMap that
`spec.template.configMapName` / `key` names. String values may use `${VAR}` variables
(listed in `VARIABLES`); a value that is exactly `${PORT}` or `${TENSOR_PARALLEL}` becomes
an integer. `$${` writes a literal `${`. Kubernetes' own `$(VAR)` syntax is left alone.
Unknown variables are errors, so a typo surfaces as a condition instead of a broken pod.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

VARIABLES = (
    "POOL_NAME", "NAMESPACE", "ROLE", "MODEL_NAME", "MODEL_LABEL", "MODEL_URI", "MODEL_PATH",
    "PORT", "ENGINE", "IMAGE", "TENSOR_PARALLEL", "DATA_PARALLEL",
)
_VAR = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)\}")


class TemplateError(ValueError):
    """The base template is missing, unparsable or uses an unknown variable."""


# Values under these keys must stay strings even when they are exactly `${PORT}`.
_STRING_FIELDS = frozenset({"labels", "annotations", "args", "command", "value", "data"})


def expand(node: Any, values: dict[str, str | int], as_string: bool = False) -> Any:
    """Expand `${VAR}` in every string of a parsed YAML tree (returns a new tree)."""
    if isinstance(node, dict):
        return {
            k: expand(v, values, as_string or k in _STRING_FIELDS) for k, v in node.items()
        }
    if isinstance(node, list):
        return [expand(v, values, as_string) for v in node]
    if not isinstance(node, str):
        return node
    whole = _VAR.fullmatch(node)
    if whole and not whole.group(1) and not as_string:
        name = whole.group(2)
        if name not in values:
            raise TemplateError(f"unknown template variable ${{{name}}}")
        return values[name]

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return "${" + m.group(2) + "}"
        if m.group(2) not in values:
            raise TemplateError(f"unknown template variable ${{{m.group(2)}}}")
        return str(values[m.group(2)])

    return _VAR.sub(sub, node)


def parse(text: str) -> dict[str, Any]:
    """Parse a template document; it must be a Deployment (apps/v1) or a bare pod template."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TemplateError(f"template is not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise TemplateError("template must be a YAML mapping (a Deployment)")
    kind = doc.get("kind", "Deployment")
    if kind != "Deployment":
        raise TemplateError(f"template kind must be Deployment, got {kind!r}")
    spec = doc.get("spec") or {}
    if not isinstance(spec, dict) or not isinstance(spec.get("template", {}), dict):
        raise TemplateError("template spec.template must be a mapping")
    return doc


def from_configmap(cm: dict[str, Any], key: str) -> dict[str, Any]:
    data = cm.get("data") or {}
    name = (cm.get("metadata") or {}).get("name", "?")
    if key not in data:
        raise TemplateError(f"ConfigMap {name} has no key {key!r}")
    return parse(str(data[key]))
