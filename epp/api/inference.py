"""Gateway API Inference Extension resources as pydantic models. Pure data, no I/O.

- `InferencePool`      inference.networking.k8s.io/v1           (selector, target ports, EPP ref)
- `InferenceModel`     inference.networking.x-k8s.io/v1alpha2   (model name, criticality,
                                                                 weighted target models)
- `InferenceObjective` inference.networking.x-k8s.io/v1alpha2   (integer priority)

Field names are camelCase on the wire and snake_case in Python. The models are lenient
readers (unknown fields are ignored: clusters run newer versions of these APIs) but check
what the EPP relies on (ports in range, 1-8 target ports, a non-empty selector).
`manifests/crds/` holds the matching CRDs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
POOL_PLURAL = "inferencepools"
POOL_KIND = "InferencePool"
X_GROUP = "inference.networking.x-k8s.io"
X_VERSION = "v1alpha2"
MODEL_PLURAL = "inferencemodels"
MODEL_KIND = "InferenceModel"
OBJECTIVE_PLURAL = "inferenceobjectives"
OBJECTIVE_KIND = "InferenceObjective"

CriticalityName = Literal["Critical", "Standard", "Sheddable"]
FailureMode = Literal["FailOpen", "FailClose"]


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class ObjectMeta(_Wire):
    name: str
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    generation: int = 0
    creation_timestamp: datetime | None = None
    deletion_timestamp: datetime | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def created(self) -> float:
        """Creation time as a POSIX timestamp (0 when unknown)."""
        return self.creation_timestamp.timestamp() if self.creation_timestamp else 0.0


# ---- InferencePool ----------------------------------------------------------------------
class LabelSelector(_Wire):
    match_labels: dict[str, str] = Field(min_length=1)

    def selector_string(self) -> str:
        """`k=v,k2=v2`, the form of the list/watch `labelSelector` parameter."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.match_labels.items()))


class PortNumber(_Wire):
    number: int = Field(ge=1, le=65535)


class EndpointPickerRef(_Wire):
    group: str = ""
    kind: str = "Service"
    name: str = Field(min_length=1)
    port: PortNumber | None = None
    failure_mode: FailureMode = "FailClose"


class InferencePoolSpec(_Wire):
    selector: LabelSelector
    target_ports: list[PortNumber] = Field(min_length=1, max_length=8)
    app_protocol: str | None = None
    endpoint_picker_ref: EndpointPickerRef | None = None

    @property
    def ports(self) -> tuple[int, ...]:
        """Target port numbers, duplicates dropped, in declaration order."""
        return tuple(dict.fromkeys(p.number for p in self.target_ports))


class Condition(_Wire):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    observed_generation: int | None = None
    last_transition_time: datetime | None = None


class ParentRef(_Wire):
    group: str | None = None
    kind: str | None = None
    name: str
    namespace: str | None = None


class PoolParentStatus(_Wire):
    parent_ref: ParentRef
    conditions: list[Condition] = Field(default_factory=list)


class InferencePoolStatus(_Wire):
    parents: list[PoolParentStatus] = Field(default_factory=list)


class InferencePool(_Wire):
    api_version: str = f"{POOL_GROUP}/{POOL_VERSION}"
    kind: Literal["InferencePool"] = "InferencePool"
    metadata: ObjectMeta
    spec: InferencePoolSpec
    status: InferencePoolStatus | None = None


# ---- pool references (InferenceModel, InferenceObjective) --------------------------------
class PoolRef(_Wire):
    group: str = POOL_GROUP
    kind: str = POOL_KIND
    name: str = Field(min_length=1)

    def refers_to(self, pool_name: str) -> bool:
        return self.name == pool_name and self.kind == POOL_KIND and self.group in (
            POOL_GROUP, X_GROUP)


# ---- InferenceModel ----------------------------------------------------------------------
class TargetModel(_Wire):
    name: str = Field(min_length=1)
    weight: int | None = Field(default=None, ge=0, le=1_000_000)


class InferenceModelSpec(_Wire):
    model_name: str = Field(min_length=1)
    criticality: CriticalityName | None = None
    target_models: list[TargetModel] = Field(default_factory=list)
    pool_ref: PoolRef


class InferenceModel(_Wire):
    api_version: str = f"{X_GROUP}/{X_VERSION}"
    kind: Literal["InferenceModel"] = "InferenceModel"
    metadata: ObjectMeta
    spec: InferenceModelSpec


# ---- InferenceObjective ------------------------------------------------------------------
class InferenceObjectiveSpec(_Wire):
    priority: int | None = None
    pool_ref: PoolRef


class InferenceObjective(_Wire):
    api_version: str = f"{X_GROUP}/{X_VERSION}"
    kind: Literal["InferenceObjective"] = "InferenceObjective"
    metadata: ObjectMeta
    spec: InferenceObjectiveSpec
