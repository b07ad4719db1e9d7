"""Server-side apply of rendered objects, conflict policy, and pruning.

Conflict policy: a field we manage that another *applier* (a server-side-apply manager:
another controller, a GitOps tool) now owns is reported (`ConflictError`), never stolen,
unless `force_conflicts` is set. A field changed imperatively (an Update operation:
`kubectl edit/patch/scale`) is drift: it is taken back, so the declared state wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from epp import IMAGE
from epp.api.modelpool import ModelPool
from epp.reconcile.kube import ApiError, Kube, path_for
from epp.reconcile.render import LABEL_POOL, OWNED_KINDS, Kind

FIELD_MANAGER = "epp-reconciler"
_PLURALS = {(k.api_version, k.kind): k for k in OWNED_KINDS}
_CONFLICT = re.compile(r'conflict with "([^"]+)"')


@dataclass(frozen=True)
class ApplySettings:
    manager: str = FIELD_MANAGER
    force_conflicts: bool = False
    epp_image: str = IMAGE  # the pools' EPP image unless a ModelPool names its own


class ConflictError(Exception):
    def __init__(self, obj: str, managers: list[str], message: str) -> None:
        super().__init__(f"{obj}: fields owned by {', '.join(managers) or 'another manager'}"
                         f" ({message}); not taken over (use --force-conflicts)")
        self.obj = obj
        self.managers = managers


class MissingKindError(Exception):
    """The API server does not serve a kind we must apply (CRD not installed)."""


def kind_of(obj: dict[str, Any]) -> Kind:
    return _PLURALS[(obj["apiVersion"], obj["kind"])]


def object_path(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return path_for(obj["apiVersion"], kind_of(obj).plural, meta["namespace"], meta["name"])


def _conflicting_managers(err: ApiError) -> list[str]:
    causes = ((err.body.get("details") or {}).get("causes")) or []
    names = [m for c in causes for m in _CONFLICT.findall(str(c.get("message", "")))]
    if not names:
        names = _CONFLICT.findall(str(err.body.get("message", "")))
    return sorted(set(names))


def _operations(live: dict[str, Any], managers: Iterable[str]) -> set[str]:
    wanted = set(managers)
    return {m.get("operation", "") for m in (live.get("metadata") or {}).get("managedFields")
            or [] if m.get("manager") in wanted}


async def apply_one(kube: Kube, obj: dict[str, Any], settings: ApplySettings) -> dict[str, Any]:
    path = object_path(obj)
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    try:
        return await kube.apply(path, obj, settings.manager, settings.force_conflicts)
    except ApiError as e:
        if e.not_found:
            raise MissingKindError(f"{obj['apiVersion']} {obj['kind']} is not served by the "
                                   "API server (CRD not installed?)") from e
        if not e.conflict:
            raise
        managers = _conflicting_managers(e)
        live = await kube.get(path)
        ops = _operations(live, managers)
        if managers and ops == {"Update"}:  # imperative drift: declared state wins
            return await kube.apply(path, obj, settings.manager, force=True)
        raise ConflictError(name, managers, str(e.body.get("message", ""))[:300]) from e


async def prune(kube: Kube, pool: ModelPool, wanted: list[dict[str, Any]]) -> list[str]:
    """Delete objects this pool owns that are no longer rendered. Returns their names."""
    keep = {(o["kind"], o["metadata"]["name"]) for o in wanted}
    deleted = []
    for kind in OWNED_KINDS:
        try:
            res = await kube.list_objects(
                path_for(kind.api_version, kind.plural, pool.namespace),
                f"{LABEL_POOL}={pool.name}")
        except ApiError as e:
            if e.not_found:
                continue  # kind not served: nothing of it can exist
            raise
        for item in res.get("items") or []:
            meta = item.get("metadata") or {}
            owned = any(r.get("uid") == pool.metadata.uid for r in meta.get("ownerReferences")
                        or [])
            if owned and (kind.kind, meta.get("name")) not in keep:
                await kube.delete(path_for(kind.api_version, kind.plural, pool.namespace,
                                           meta["name"]))
                deleted.append(f"{kind.kind}/{meta['name']}")
    return deleted
