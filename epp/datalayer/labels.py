"""Pod/endpoint labels -> `Endpoint` fields. Shared by every endpoint source.

The label keys are configurable (`LabelKeys`); the defaults follow the product brief:
`model`, `business`, `role` (llm-d's `llm-d.ai/role` is accepted too) and `engine-type`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from epp.datalayer.endpoint import UNASSIGNED_BUSINESS, Endpoint

DEFAULT_ENGINE = "vllm"
_ENGINE_ALIASES = {
    "vllm": "vllm",
    "sglang": "sglang",
    "trtllm": "trtllm",
    "trtllm-serve": "trtllm",
    "tensorrt-llm": "trtllm",
    "triton": "trtllm",
    "sim": "sim",
    "simulator": "sim",
    "vllm-sim": "sim",
}


@dataclass(frozen=True, slots=True)
class LabelKeys:
    """Which label carries which endpoint attribute."""

    model: str = "model"
    business: str = "business"
    role: str = "role"
    role_aliases: tuple[str, ...] = ("llm-d.ai/role",)  # consulted when `role` is absent
    engine: str = "engine-type"

    def role_of(self, labels: Mapping[str, str]) -> str | None:
        value = labels.get(self.role)
        if value is not None:
            return value
        for key in self.role_aliases:
            value = labels.get(key)
            if value is not None:
                return value
        return None


DEFAULT_LABEL_KEYS = LabelKeys()


def normalize_engine(value: str | None) -> str:
    """`vllm` | `sglang` | `trtllm` | `sim`; unknown or missing values mean vLLM-compatible."""
    if not value:
        return DEFAULT_ENGINE
    return _ENGINE_ALIASES.get(value.strip().lower(), DEFAULT_ENGINE)


def endpoint_from_labels(
    address: str,
    port: int,
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    ready: bool,
    keys: LabelKeys = DEFAULT_LABEL_KEYS,
    metrics_port: int = 0,
) -> Endpoint:
    """Build an `Endpoint` for `address:port` from its labels (the pod's, or the file's)."""
    business = labels.get(keys.business, "").strip() or UNASSIGNED_BUSINESS
    return Endpoint(
        address=address,
        port=port,
        name=name,
        namespace=namespace,
        model=labels.get(keys.model, "").strip(),
        business=business,
        role=keys.role_of(labels) or "",  # Endpoint normalizes; "" -> decode
        engine=normalize_engine(labels.get(keys.engine)),
        labels=dict(labels),
        ready=ready,
        metrics_port=metrics_port,
    )
