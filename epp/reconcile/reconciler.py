"""One reconcile pass for one ModelPool: render, apply, prune, distribute, report status.

A pass never raises for a bad spec, a missing template, an apply conflict or an API error:
it records a `Degraded` condition with a reason (and one Event per new problem) and returns
a result telling the controller whether and when to retry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from epp.api.errors import validation_message
from epp.api.modelpool import API_VERSION, KIND, PLURAL, ModelPool
from epp.reconcile import distribution, render, render_epp, status, template
from epp.reconcile.apply import (
    ApplySettings,
    ConflictError,
    MissingKindError,
    apply_one,
    prune,
)
from epp.reconcile.assignment import AssignmentError, apply_moves, list_pool_pods, pod_info
from epp.reconcile.kube import ApiError, Kube, path_for

log = logging.getLogger(__name__)
MOVE_ATTEMPTS = 3


@dataclass
class Result:
    ok: bool
    reason: str = ""
    message: str = ""
    moves: int = 0
    pruned: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)


def pool_path(namespace: str, name: str = "", sub: str = "") -> str:
    return path_for(API_VERSION, PLURAL, namespace, name, sub)


async def load_template(kube: Kube, pool: ModelPool) -> dict[str, Any] | None:
    ref = pool.spec.template
    if ref is None:
        return None
    cm = await kube.get_or_none(path_for("v1", "configmaps", pool.namespace, ref.config_map_name))
    if cm is None:
        raise template.TemplateError(f"template ConfigMap {ref.config_map_name} not found")
    return template.from_configmap(cm, ref.key)


async def emit_event(kube: Kube, raw: dict[str, Any], reason: str, message: str,
                     kind: str = "Warning") -> None:
    meta = raw.get("metadata") or {}
    ts = status.now()
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name', 'modelpool')}.",
                     "namespace": meta.get("namespace", "default")},
        "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta.get("name"),
                           "namespace": meta.get("namespace"), "uid": meta.get("uid")},
        "reason": reason,
        "message": message[:1000],
        "type": kind,
        "source": {"component": "epp-reconciler"},
        "firstTimestamp": ts,
        "lastTimestamp": ts,
        "count": 1,
    }
    try:
        await kube.create(path_for("v1", "events", meta.get("namespace", "default")), event)
    except ApiError as e:  # events are best effort
        log.warning("could not record event %s: %s", reason, e)


async def distribute(kube: Kube, pool: ModelPool, manager: str) -> tuple[int, list[Any]]:
    """Bring pod business labels to the declared distribution. Returns (moves, pods)."""
    moved = 0
    for attempt in range(MOVE_ATTEMPTS):
        pods = await list_pool_pods(kube, pool.namespace, pool.name)
        infos = [pod_info(p) for p in pods]
        moves = distribution.plan(infos, pool.spec.businesses)
        if not moves:
            return moved, pods
        try:
            await apply_moves(kube, pool.namespace, moves, manager)
            moved += len(moves)
        except AssignmentError as e:  # pod churn: re-plan from a fresh list
            log.info("pool %s/%s: %s (attempt %d)", pool.namespace, pool.name, e, attempt + 1)
    pods = await list_pool_pods(kube, pool.namespace, pool.name)
    return moved, pods


def _unsatisfied(pool: ModelPool, infos: list[distribution.PodInfo]) -> str:
    left = distribution.plan(infos, pool.spec.businesses)
    if left:
        return f"{len(left)} pod moves still pending"
    problems = []
    by_role: dict[str, list[distribution.PodInfo]] = {}
    for p in infos:
        if not p.deleting:
            by_role.setdefault(p.role, []).append(p)
    for role, members in sorted(by_role.items()):
        targets = distribution.role_targets(len(members), pool.spec.businesses)
        have = distribution.counts(members)
        for name, want in targets.items():
            if have.get(name, 0) != want:
                problems.append(f"{role}/{name} {have.get(name, 0)}/{want}")
    return ("distribution not met (pinned pods): " + ", ".join(problems)) if problems else ""


async def reconcile(kube: Kube, namespace: str, name: str, settings: ApplySettings) -> Result:
    raw = await kube.get_or_none(pool_path(namespace, name))
    if raw is None or (raw.get("metadata") or {}).get("deletionTimestamp"):
        return Result(ok=True, reason="Gone")  # children go with it (ownerReferences + GC)
    meta = raw.get("metadata") or {}
    previous = raw.get("status") or {}
    generation = int(meta.get("generation") or 0)
    problem: tuple[str, str] | None = None
    result = Result(ok=True)
    desired: dict[str, int | None] = {}
    deployments: dict[str, dict[str, Any]] = {}
    businesses: dict[str, int] = {}
    ready = 0
    unsatisfied = ""
    pool: ModelPool | None = None
    epp_status: tuple[int, dict[str, Any]] | None = None  # (replicas wanted, EPP Deployment)
    try:
        pool = ModelPool.from_dict(raw)
    except ValidationError as e:
        problem = ("InvalidSpec", validation_message(e))
    if pool is not None:
        try:
            epp_opts = render_epp.EppOptions(
                image=settings.epp_image,
                pdb_api="policy/v1" if await kube.serves("policy/v1") else "policy/v1beta1",
            )
            objs = render.render(pool, await load_template(kube, pool), epp=epp_opts)
            for obj in objs:
                await apply_one(kube, obj, settings)
            result.pruned = await prune(kube, pool, objs)
            result.moves, pods = await distribute(kube, pool, settings.manager)
            infos = [pod_info(p) for p in pods]
            businesses = distribution.counts(infos)
            ready = sum(1 for p in infos if p.ready)
            unsatisfied = _unsatisfied(pool, infos)
            for role, spec in pool.spec.roles.items():
                desired[role] = None if pool.spec.decouple_scaling else spec.replicas
                dep = await kube.get_or_none(
                    path_for("apps/v1", "deployments", namespace, f"{name}-{role}"))
                deployments[role] = dep or {}
            if pool.spec.epp.managed:
                epp_dep = await kube.get_or_none(
                    path_for("apps/v1", "deployments", namespace, render_epp.name(pool)))
                epp_status = (pool.spec.epp.replicas, epp_dep or {})
        except template.TemplateError as e:
            problem = ("InvalidTemplate", str(e))
        except ValueError as e:
            problem = ("InvalidSpec", str(e))
        except ConflictError as e:
            problem = ("ApplyConflict", str(e))
        except MissingKindError as e:
            problem = ("MissingCRD", str(e))
        except ApiError as e:
            problem = ("ApplyFailed", str(e))
    obs = status.Observed(generation, desired, deployments, businesses, ready, problem,
                          unsatisfied, epp_status)
    new_status = status.compute(obs, previous)
    if problem is not None:
        result.ok, result.reason, result.message = False, problem[0], problem[1]
        old: dict[str, Any] = next(
            (c for c in previous.get("conditions") or [] if c.get("type") == "Degraded"), {})
        if (old.get("status"), old.get("reason"), old.get("message")) != \
                ("True", problem[0], problem[1]):
            await emit_event(kube, raw, problem[0], problem[1])
            log.warning("ModelPool %s/%s: %s: %s", namespace, name, *problem)
    if new_status != previous:
        patch = dict(new_status)
        for key in ("roles", "businesses"):  # a merge patch keeps map keys unless nulled
            gone = set(previous.get(key) or {}) - set(new_status[key])
            patch[key] = {**new_status[key], **dict.fromkeys(gone)}
        if "epp" in previous and "epp" not in new_status:  # managed turned off
            patch["epp"] = None
        try:
            await kube.merge_patch(pool_path(namespace, name, "status"), {"status": patch},
                                   settings.manager)
        except ApiError as e:
            if not e.not_found:
                raise
    result.status = new_status
    return result
