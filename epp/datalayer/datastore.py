"""The datastore: the current set of endpoints and model definitions.

Sources (static file, Kubernetes watch) push full or incremental views; the datastore keeps
one `Endpoint` object per `ip:port` for as long as it exists, so the live state attached to
it (scraped metrics, in-flight accounting, latency model) survives label changes. The
request path only reads tuples that are rebuilt when something changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from epp.api.names import model_label_value
from epp.datalayer.endpoint import Endpoint

log = logging.getLogger(__name__)


class Criticality(StrEnum):
    CRITICAL = "Critical"
    STANDARD = "Standard"
    SHEDDABLE = "Sheddable"


@dataclass(frozen=True, slots=True)
class TargetModel:
    name: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What an InferenceModel (or the static config) says about a served model name."""

    name: str
    criticality: Criticality = Criticality.STANDARD
    target_models: tuple[TargetModel, ...] = ()
    source: str = ""  # object key, e.g. "ns/name"
    created: float = 0.0  # creation timestamp; oldest wins on conflicts


@dataclass(frozen=True, slots=True)
class Objective:
    """An InferenceObjective: an integer priority selected by header (negative = sheddable)."""

    name: str
    priority: int = 0


EndpointListener = Callable[[Endpoint], None]


@dataclass(slots=True)
class _Snapshot:
    version: int = -1
    all: tuple[Endpoint, ...] = ()
    by_model: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    any_model: tuple[Endpoint, ...] = ()  # endpoints without a model label


class Datastore:
    def __init__(self) -> None:
        self._endpoints: dict[str, Endpoint] = {}
        self._owner: dict[str, str] = {}  # endpoint key -> source name
        self._models: dict[str, ModelInfo] = {}
        self._model_sources: dict[str, dict[str, ModelInfo]] = {}
        self._objectives: dict[str, Objective] = {}
        self._version = 0
        self._snap = _Snapshot()
        self._synced: dict[str, bool] = {}
        self._synced_event = asyncio.Event()
        self._on_add: list[EndpointListener] = []
        self._on_remove: list[EndpointListener] = []

    # ---- sources -------------------------------------------------------------------
    def register_source(self, name: str) -> None:
        """A source must call `mark_synced(name)` after its first full view."""
        self._synced.setdefault(name, False)
        self._synced_event.clear()

    def mark_synced(self, name: str) -> None:
        self._synced[name] = True
        if all(self._synced.values()):
            self._synced_event.set()

    @property
    def synced(self) -> bool:
        return bool(self._synced) and all(self._synced.values())

    async def wait_synced(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._synced_event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def replace_endpoints(self, source: str, endpoints: Iterable[Endpoint]) -> None:
        """Make `endpoints` the complete set owned by `source`."""
        wanted = {ep.key: ep for ep in endpoints}
        for key in [k for k, owner in self._owner.items() if owner == source and k not in wanted]:
            self._remove(key)
        for ep in wanted.values():
            self.upsert_endpoint(source, ep)

    def upsert_endpoint(self, source: str, ep: Endpoint) -> Endpoint:
        """Add or update; an existing endpoint keeps its live state. Returns the stored one."""
        cur = self._endpoints.get(ep.key)
        if cur is None:
            self._endpoints[ep.key] = ep
            self._owner[ep.key] = source
            self._bump()
            for cb in self._on_add:
                cb(ep)
            return ep
        self._owner[ep.key] = source
        if cur.identity() != ep.identity():
            cur.name, cur.namespace = ep.name, ep.namespace
            cur.model, cur.business, cur.role = ep.model, ep.business, ep.role
            cur.engine, cur.ready, cur.metrics_port = ep.engine, ep.ready, ep.metrics_port
            cur.labels, cur.served_models = ep.labels, ep.served_models
            self._bump()
        return cur

    def remove_endpoint(self, key: str) -> None:
        if key in self._endpoints:
            self._remove(key)

    def _remove(self, key: str) -> None:
        ep = self._endpoints.pop(key)
        self._owner.pop(key, None)
        self._bump()
        for cb in self._on_remove:
            cb(ep)

    def _bump(self) -> None:
        self._version += 1

    # ---- models --------------------------------------------------------------------
    def replace_models(self, source: str, models: Iterable[ModelInfo]) -> None:
        self._model_sources[source] = {m.source or m.name: m for m in models}
        self._rebuild_models()

    def upsert_model(self, source: str, model: ModelInfo) -> None:
        self._model_sources.setdefault(source, {})[model.source or model.name] = model
        self._rebuild_models()

    def remove_model(self, source: str, object_key: str) -> None:
        if self._model_sources.get(source, {}).pop(object_key, None) is not None:
            self._rebuild_models()

    def _rebuild_models(self) -> None:
        merged: dict[str, ModelInfo] = {}
        for infos in self._model_sources.values():
            for info in infos.values():
                cur = merged.get(info.name)
                # Conflicting modelNames: the oldest object wins (then the name, for stability).
                if cur is None or (info.created, info.source) < (cur.created, cur.source):
                    merged[info.name] = info
        self._models = merged
        self._bump()

    def model(self, name: str) -> ModelInfo | None:
        return self._models.get(name)

    @property
    def has_model_definitions(self) -> bool:
        return bool(self._models)

    def models(self) -> dict[str, ModelInfo]:
        return dict(self._models)

    def replace_objectives(self, objectives: Iterable[Objective]) -> None:
        self._objectives = {o.name: o for o in objectives}

    def objective(self, name: str) -> Objective | None:
        return self._objectives.get(name)

    # ---- reads (hot path) -------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version

    def get(self, key: str) -> Endpoint | None:
        return self._endpoints.get(key)

    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._snapshot().all

    def endpoints_for_model(self, model: str) -> tuple[Endpoint, ...]:
        """Endpoints labelled with `model` plus unlabelled ones (they serve any model)."""
        snap = self._snapshot()
        hit = snap.by_model.get(model)
        if hit is None:
            # Label values cannot hold every model name (`org/model`): the reconciler labels
            # pods with model_label_value(name), so accept either spelling.
            alias = model_label_value(model)
            labelled = tuple(
                ep
                for ep in snap.all
                if (ep.model or ep.served_models) and (ep.serves(model) or ep.serves(alias))
            )
            hit = labelled + snap.any_model if snap.any_model else labelled
            snap.by_model[model] = hit
        return hit

    def _snapshot(self) -> _Snapshot:
        snap = self._snap
        if snap.version != self._version:
            all_eps = tuple(self._endpoints.values())
            snap = _Snapshot(
                version=self._version,
                all=all_eps,
                any_model=tuple(ep for ep in all_eps if not ep.model and not ep.served_models),
            )
            self._snap = snap
        return snap

    # ---- listeners ---------------------------------------------------------------------
    def on_endpoint_added(self, cb: EndpointListener) -> None:
        self._on_add.append(cb)

    def on_endpoint_removed(self, cb: EndpointListener) -> None:
        self._on_remove.append(cb)
