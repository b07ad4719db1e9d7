"""ModelPool status from what the cluster reports. Pure functions.

Conditions (`Ready`, `Progressing`, `Degraded`) keep their `lastTransitionTime` while their
status does not change, so writing an unchanged status is a no-op on the API server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass
class Observed:
    """What one reconcile pass saw and did."""

    generation: int
    desired: dict[str, int | None]  # role -> replicas wanted (None = autoscaler decides)
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> object
    businesses: dict[str, int] = field(default_factory=dict)
    ready_endpoints: int = 0
    problem: tuple[str, str] | None = None  # (reason, message) when the pass failed
    unsatisfied: str = ""  # distribution that could not be met (pinned pods), if any
    epp: tuple[int, dict[str, Any]] | None = None  # managed EPP: (replicas wanted, Deployment)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cond(
    previous: list[dict[str, Any]], ctype: str, status: bool, reason: str, message: str, gen: int
) -> dict[str, Any]:
    value = "True" if status else "False"
    old = next((c for c in previous if c.get("type") == ctype), None)
    since = old["lastTransitionTime"] if old and old.get("status") == value and \
        old.get("lastTransitionTime") else now()
    return {"type": ctype, "status": value, "reason": reason, "message": message,
            "lastTransitionTime": since, "observedGeneration": gen}


def compute(observed: Observed, previous: dict[str, Any]) -> dict[str, Any]:
    prev_conds: list[dict[str, Any]] = list(previous.get("conditions") or [])
    gen = observed.generation
    roles: dict[str, dict[str, int]] = {}
    not_ready: list[str] = []
    rolling: list[str] = []

    def deployment_counts(what: str, want: int | None, dep: dict[str, Any]) -> dict[str, int]:
        st = dep.get("status") or {}
        spec_replicas = (dep.get("spec") or {}).get("replicas", 0)
        desired = spec_replicas if want is None else want
        ready = int(st.get("readyReplicas") or 0)
        updated = int(st.get("updatedReplicas") or 0)
        if ready < desired:
            not_ready.append(f"{what} {ready}/{desired} ready")
        stale = (dep.get("metadata") or {}).get("generation", 0) != st.get("observedGeneration")
        if stale or updated < desired or int(st.get("replicas") or 0) != desired:
            rolling.append(what)
        return {"replicas": int(st.get("replicas") or 0), "readyReplicas": ready,
                "updatedReplicas": updated}

    for role, want in observed.desired.items():
        roles[role] = deployment_counts(role, want, observed.deployments.get(role) or {})
    epp = None
    if observed.epp is not None:
        epp = deployment_counts("epp", observed.epp[0], observed.epp[1])
    conds = []
    if observed.problem is not None:
        reason, msg = observed.problem
        conds.append(_cond(prev_conds, "Ready", False, reason, msg, gen))
        conds.append(_cond(prev_conds, "Progressing", False, reason, msg, gen))
        conds.append(_cond(prev_conds, "Degraded", True, reason, msg, gen))
    else:
        ready = not not_ready
        conds.append(_cond(prev_conds, "Ready", ready,
                           "AllReplicasReady" if ready else "ReplicasNotReady",
                           "; ".join(not_ready) or "all roles ready", gen))
        moving = bool(rolling or not_ready)
        conds.append(_cond(prev_conds, "Progressing", moving,
                           "RollingOut" if moving else "Stable",
                           f"rolling out: {', '.join(rolling or not_ready)}" if moving
                           else "objects applied and stable", gen))
        degraded = bool(observed.unsatisfied)
        conds.append(_cond(prev_conds, "Degraded", degraded,
                           "DistributionUnsatisfiable" if degraded else "AsExpected",
                           observed.unsatisfied or "no problem", gen))
    out: dict[str, Any] = {
        "observedGeneration": gen,
        "roles": roles,
        "businesses": dict(sorted(observed.businesses.items())),
        "readyEndpoints": observed.ready_endpoints,
        "conditions": conds,
    }
    if epp is not None:
        out["epp"] = epp
    return out

