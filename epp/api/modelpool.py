"""The `ModelPool` custom resource (group `epp.dev`, version `v1alpha1`) as pydantic models.

Pure data and validation, no I/O. Field names are camelCase on the wire (as in the CRD,
`manifests/crds/modelpool.yaml`) and snake_case in Python.

One ModelPool describes one served model on one engine, split into roles (`prefill`,
`decode`) and shared between businesses (production, testing, ...). The reconciler
(`epp.reconcile`) renders it into Deployments, Services, an InferencePool, InferenceModels
and one HTTPRoute per business.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from epp.api.names import model_label_value as model_label_value

GROUP = "epp.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelPool"
PLURAL = "modelpools"

UNASSIGNED = "unassigned"
ROLES = ("prefill", "decode")
ARTIFACT_SCHEMES = ("hf", "pvc", "oci")
Engine = Literal["vllm", "sglang", "sim"]
Criticality = Literal["Critical", "Standard", "Sheddable"]
FailureMode = Literal["FailOpen", "FailClose"]

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class ObjectMeta(BaseModel):
    """The subset of metadata the reconciler reads; everything else is kept but ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    resource_version: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    deletion_timestamp: str | None = None

    @field_validator("name")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        if not _DNS_LABEL.match(v) or len(v) > 40:
            raise ValueError(
                f"name {v!r} must be a DNS label of at most 40 characters "
                "(role and business suffixes are appended to it)"
            )
        return v


class ModelSpec(_Model):
    name: str = Field(description="served model name, as clients send it in `model`")
    uri: str = Field(description="hf://org/model[@revision] | pvc://claim/path | oci://image")
    label: str = Field(default="", description="value of the pods' `model` label; default derived")

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str) -> str:
        scheme, sep, rest = v.partition("://")
        if not sep or scheme not in ARTIFACT_SCHEMES or not rest.strip("/"):
            raise ValueError(f"artifact uri {v!r} must be hf://, pvc:// or oci:// with a target")
        if scheme == "hf" and rest.count("/") < 1:
            raise ValueError(f"artifact uri {v!r}: hf:// needs org/model")
        return v

    @field_validator("label")
    @classmethod
    def _label(cls, v: str) -> str:
        if v and (len(v) > 63 or not _LABEL_VALUE.match(v)):
            raise ValueError(f"model label {v!r} is not a valid label value")
        return v


class TemplateRef(_Model):
    config_map_name: str
    key: str = "deployment.yaml"


class EnvVar(_Model):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")
    name: str
    value: str = ""


class Resources(_Model):
    requests: dict[str, str | int] = Field(default_factory=dict)
    limits: dict[str, str | int] = Field(default_factory=dict)


class ContainerOverride(_Model):
    """Merged into the template's container of the same name (or appended). Empty = keep."""

    name: str
    image: str = ""
    command: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    env: list[EnvVar] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)


class Parallelism(_Model):
    tensor: int = Field(default=1, ge=1, le=64)
    data: int = Field(default=1, ge=1, le=64)


class RoleSpec(_Model):
    replicas: int = Field(default=1, ge=0, le=1000)
    parallelism: Parallelism = Field(default_factory=Parallelism)
    accelerator_selector: dict[str, str] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    containers: list[ContainerOverride] = Field(default_factory=list)
    extra_args: list[str] = Field(default_factory=list)


class Roles(_Model):
    prefill: RoleSpec | None = None
    decode: RoleSpec = Field(default_factory=RoleSpec)

    def items(self) -> list[tuple[str, RoleSpec]]:
        out: list[tuple[str, RoleSpec]] = []
        if self.prefill is not None:
            out.append(("prefill", self.prefill))
        out.append(("decode", self.decode))
        return out


class HeaderMatch(_Model):
    name: str
    value: str


class RouteMatch(_Model):
    hostnames: list[str] = Field(default_factory=list)
    path: str = "/"
    headers: list[HeaderMatch] = Field(default_factory=list)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"route path {v!r} must start with /")
        return v


class Business(_Model):
    name: str
    replicas: int | None = Field(default=None, ge=0, le=1000, description="exact pods per role")
    share: int | None = Field(
        default=None, ge=0, le=1000, description="weight of the remaining pods"
    )
    criticality: Criticality = "Standard"
    model_name: str = Field(default="", description="model name clients of this business use")
    match: RouteMatch = Field(default_factory=RouteMatch)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _DNS_LABEL.match(v) or len(v) > 20:
            raise ValueError(f"business name {v!r} must be a DNS label of at most 20 chars")
        if v == UNASSIGNED:
            raise ValueError(f"business name {UNASSIGNED!r} is reserved")
        return v

    @model_validator(mode="after")
    def _one_of(self) -> Business:
        if self.replicas is not None and self.share is not None:
            raise ValueError(f"business {self.name!r}: set replicas or share, not both")
        return self


class ParentRef(_Model):
    name: str
    namespace: str = ""
    section_name: str = ""
    group: str = "gateway.networking.k8s.io"
    kind: str = "Gateway"


class GatewaySpec(_Model):
    parent_refs: list[ParentRef] = Field(default_factory=list)


class EppSpec(_Model):
    """The pool's endpoint picker. `managed` (the default): the reconciler renders it
    (Deployment, Service, ServiceAccount, read-only Role + RoleBinding, PodDisruptionBudget);
    off: the InferencePool points at `serviceName`, an EPP installed by other means."""

    managed: bool = Field(default=True, description="render and run the pool's EPP")
    service_name: str = Field(default="", description="EPP Service; default <pool>-epp")
    port: int = Field(default=9002, ge=1, le=65535)
    failure_mode: FailureMode = "FailClose"
    business_header: str = "x-business"
    image: str = Field(default="", description="EPP image; default the reconciler's --epp-image")
    replicas: int = Field(default=1, ge=0, le=100)
    config: dict[str, Any] | None = Field(
        default=None, description="EndpointPickerConfig (plugins, schedulingProfiles); "
        "default the EPP's built-in config")
    resources: Resources = Field(default_factory=Resources)
    extra_args: list[str] = Field(default_factory=list, description="more `epp serve` flags")

    @field_validator("business_header")
    @classmethod
    def _header(cls, v: str) -> str:
        if not _HEADER_NAME.match(v):
            raise ValueError(f"business header {v!r} is not a valid header name")
        return v.lower()


class SidecarSpec(_Model):
    """The P/D sidecar (`epp sidecar`) the reconciler puts in front of the engine in decode
    pods when the pool has a prefill role: the pod's serving port (`spec.port`) is the
    sidecar's, the engine moves to `enginePort`."""

    image: str = Field(default="", description="sidecar image; default the epp image")
    engine_port: int = Field(
        default=8200, ge=1, le=65535, description="the engine's port inside decode pods"
    )
    connector: Literal["", "nixlv2", "sglang"] = Field(
        default="", description="P/D protocol; default by engine: sglang for SGLang, else "
        "nixlv2 (vLLM kv_transfer_params)"
    )
    prefill_timeout_seconds: float = Field(
        default=30.0, ge=0.1, description="then the request is decoded locally (reported)"
    )
    resources: Resources = Field(default_factory=Resources)
    extra_args: list[str] = Field(default_factory=list, description="more `epp sidecar` flags")


class ModelPoolSpec(_Model):
    model: ModelSpec
    engine: Engine = "vllm"
    image: str = ""
    port: int = Field(default=8000, ge=1, le=65535)
    template: TemplateRef | None = None
    roles: Roles = Field(default_factory=Roles)
    decouple_scaling: bool = False
    businesses: list[Business] = Field(default_factory=list)
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)
    epp: EppSpec = Field(default_factory=EppSpec)
    sidecar: SidecarSpec = Field(default_factory=SidecarSpec)

    @model_validator(mode="after")
    def _consistent(self) -> ModelPoolSpec:
        if self.roles.prefill is not None and self.sidecar.engine_port == self.port:
            raise ValueError(
                f"sidecar.enginePort {self.sidecar.engine_port} must differ from port: decode "
                "pods serve on port through the P/D sidecar, the engine listens on enginePort"
            )
        names = [b.name for b in self.businesses]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate business names: {sorted(dup)}")
        matches = [
            (
                tuple(sorted(b.match.hostnames)),
                b.match.path,
                tuple(sorted((h.name.lower(), h.value) for h in b.match.headers)),
            )
            for b in self.businesses
        ]
        if len(set(matches)) != len(matches):
            raise ValueError(
                "two businesses have the same route match (hostnames, path, headers); "
                "the gateway could not tell their requests apart"
            )
        crit: dict[str, str] = {}
        for b in self.businesses:
            served = b.model_name or self.model.name
            if crit.setdefault(served, b.criticality) != b.criticality:
                raise ValueError(
                    f"businesses serving model {served!r} declare different criticalities; "
                    "give one of them its own modelName"
                )
        return self


class ModelPool(BaseModel):
    """A whole ModelPool object (status is kept as raw data; the reconciler owns it)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    api_version: str = API_VERSION
    kind: str = KIND
    metadata: ObjectMeta
    spec: ModelPoolSpec
    status: dict[str, Any] = Field(default_factory=dict)

    @field_validator("api_version")
    @classmethod
    def _api_version(cls, v: str) -> str:
        if v != API_VERSION:
            raise ValueError(f"apiVersion must be {API_VERSION}, got {v!r}")
        return v

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v != KIND:
            raise ValueError(f"kind must be {KIND}, got {v!r}")
        return v

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ModelPool:
        return cls.model_validate(obj)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    def epp_service(self) -> str:
        return self.spec.epp.service_name or f"{self.name}-epp"
