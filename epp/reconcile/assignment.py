"""Moving pods between businesses: one atomic JSON patch per pod, rollback on failure.

Each relabel is a JSON patch whose first operation *tests* the pod's current business, so a
pod that someone else relabelled meanwhile is never clobbered (the patch fails with 422 and
the whole batch is rolled back). Only labels change: the pod keeps running and requests in
flight on it complete; the EPP sees the new label on its next watch event.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from epp.api.modelpool import UNASSIGNED
from epp.reconcile.distribution import PIN_ANNOTATION, Move, PodInfo
from epp.reconcile.kube import ApiError, Kube, path_for
from epp.reconcile.render import LABEL_BUSINESS, LABEL_POOL, LABEL_ROLE

log = logging.getLogger(__name__)
_BUSINESS_PATH = f"/metadata/labels/{LABEL_BUSINESS}"
_PIN_PATH = "/metadata/annotations/" + PIN_ANNOTATION.replace("~", "~0").replace("/", "~1")


class AssignmentError(Exception):
    """A relabel failed; `rolled_back` tells whether the earlier moves were undone."""

    def __init__(self, move: Move, cause: Exception, rolled_back: bool) -> None:
        super().__init__(f"moving pod {move.pod} {move.source}->{move.target} failed: {cause}"
                         + ("" if rolled_back else " (rollback incomplete)"))
        self.move = move
        self.cause = cause
        self.rolled_back = rolled_back


def pod_info(pod: dict[str, Any]) -> PodInfo:
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    conds = (pod.get("status") or {}).get("conditions") or []
    ready = bool((pod.get("status") or {}).get("podIP")) and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in conds)
    return PodInfo(
        name=meta.get("name", ""),
        role=labels.get(LABEL_ROLE, ""),
        business=labels.get(LABEL_BUSINESS) or UNASSIGNED,
        ready=ready and not meta.get("deletionTimestamp"),
        created=meta.get("creationTimestamp", ""),
        deleting=bool(meta.get("deletionTimestamp")),
        pinned=(meta.get("annotations") or {}).get(PIN_ANNOTATION) == "true",
    )


async def list_pool_pods(kube: Kube, namespace: str, pool: str) -> list[dict[str, Any]]:
    res = await kube.list_objects(path_for("v1", "pods", namespace), f"{LABEL_POOL}={pool}")
    items: list[dict[str, Any]] = res.get("items") or []
    return items


def relabel_ops(source: str, target: str, had_label: bool = True) -> list[dict[str, Any]]:
    if had_label:
        return [{"op": "test", "path": _BUSINESS_PATH, "value": source},
                {"op": "replace", "path": _BUSINESS_PATH, "value": target}]
    return [{"op": "add", "path": _BUSINESS_PATH, "value": target}]


async def relabel(kube: Kube, namespace: str, move: Move, manager: str,
                  extra: Sequence[dict[str, Any]] = ()) -> None:
    ops = [*relabel_ops(move.source, move.target), *extra]
    await kube.json_patch(path_for("v1", "pods", namespace, move.pod), ops, manager)


async def apply_moves(kube: Kube, namespace: str, moves: Sequence[Move], manager: str) -> None:
    """Apply all moves or none: on the first failure undo the ones already applied."""
    done: list[Move] = []
    for move in moves:
        try:
            await relabel(kube, namespace, move, manager)
        except ApiError as e:
            ok = True
            for prev in reversed(done):
                try:
                    await relabel(kube, namespace, Move(prev.pod, prev.target, prev.source),
                                  manager)
                except ApiError as re:
                    if not re.not_found:  # a pod that is gone needs no rollback
                        ok = False
                        log.warning("rollback of %s failed: %s", prev.pod, re)
            raise AssignmentError(move, e, ok) from e
        done.append(move)


async def assign(kube: Kube, namespace: str, pod_name: str, business: str, manager: str,
                 pin: bool = True) -> Move:
    """Relabel one pod (one atomic patch) and pin it there so the reconciler keeps it."""
    pod = await kube.get(path_for("v1", "pods", namespace, pod_name))
    info = pod_info(pod)
    move = Move(pod_name, info.business, business)
    has_label = LABEL_BUSINESS in ((pod.get("metadata") or {}).get("labels") or {})
    ops = relabel_ops(info.business, business, has_label)
    annotations = (pod.get("metadata") or {}).get("annotations")
    if pin:
        if annotations is None:
            ops.append({"op": "add", "path": "/metadata/annotations",
                        "value": {PIN_ANNOTATION: "true"}})
        else:
            ops.append({"op": "add", "path": _PIN_PATH, "value": "true"})
    elif annotations and PIN_ANNOTATION in annotations:
        ops.append({"op": "remove", "path": _PIN_PATH})
    await kube.json_patch(path_for("v1", "pods", namespace, pod_name), ops, manager)
    return move
