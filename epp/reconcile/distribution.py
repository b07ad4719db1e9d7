"""Business distribution: which pod should carry which `business` label. Pure planning.

Targets are computed per role. Businesses with `replicas` get exactly that many pods of each
role (declaration order, as far as pods go); the pods left are split between businesses with
a `share` by largest remainder; whatever is still left stays `unassigned`.

The plan moves as few pods as possible: a business over its target releases its not-ready
pods first, then its newest; a business under target takes released pods, ready and oldest
first. Pinned pods (`epp pool assign`) and pods being deleted are never moved.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from epp.api.modelpool import UNASSIGNED, Business

PIN_ANNOTATION = "epp.dev/business-pinned"


@dataclass(frozen=True)
class PodInfo:
    name: str
    role: str
    business: str
    ready: bool = False
    created: str = ""  # RFC 3339; sorts chronologically
    deleting: bool = False
    pinned: bool = False


@dataclass(frozen=True)
class Move:
    pod: str
    source: str
    target: str


def role_targets(n: int, businesses: Sequence[Business]) -> dict[str, int]:
    """How many of `n` pods of one role each business (and `unassigned`) should have."""
    targets: dict[str, int] = {b.name: 0 for b in businesses}
    left = n
    for b in businesses:
        if b.replicas is not None:
            targets[b.name] = min(b.replicas, left)
            left -= targets[b.name]
    shared = [b for b in businesses if b.share is not None and b.share > 0]
    total = sum(b.share or 0 for b in shared)
    if shared and left > 0:
        exact = {b.name: left * (b.share or 0) / total for b in shared}
        floors = {name: int(v) for name, v in exact.items()}
        rest = left - sum(floors.values())
        order = sorted(shared, key=lambda b: -(exact[b.name] - floors[b.name]))  # stable
        for b in order[:rest]:
            floors[b.name] += 1
        for name, k in floors.items():
            targets[name] += k
        left = 0
    targets[UNASSIGNED] = left
    return targets


def _release_order(p: PodInfo) -> tuple[bool, str]:
    return (p.ready, _neg(p.created))  # not ready first, then newest


def _neg(ts: str) -> str:
    return "".join(chr(0x10FFFF - ord(c)) for c in ts)


def plan_role(pods: Iterable[PodInfo], businesses: Sequence[Business]) -> list[Move]:
    live = [p for p in pods if not p.deleting]
    targets = role_targets(len(live), businesses)
    by_business: dict[str, list[PodInfo]] = {}
    for p in live:
        by_business.setdefault(p.business, []).append(p)
    released: list[PodInfo] = []
    for name, members in by_business.items():
        extra = len(members) - targets.get(name, 0)
        if extra <= 0:
            continue
        movable = sorted((p for p in members if not p.pinned), key=_release_order)
        released += movable[:extra]
    released.sort(key=lambda p: (not p.ready, p.created))  # ready and oldest first
    moves: list[Move] = []
    order = [b.name for b in businesses] + [UNASSIGNED]
    for name in order:
        missing = targets[name] - len(by_business.get(name, []))
        while missing > 0 and released:
            p = released.pop(0)
            moves.append(Move(p.name, p.business, name))
            missing -= 1
    return moves


def plan(pods: Iterable[PodInfo], businesses: Sequence[Business]) -> list[Move]:
    """Moves that bring every role to its target distribution."""
    by_role: dict[str, list[PodInfo]] = {}
    for p in pods:
        by_role.setdefault(p.role, []).append(p)
    moves: list[Move] = []
    for role in sorted(by_role):
        moves += plan_role(by_role[role], businesses)
    return moves


def counts(pods: Iterable[PodInfo]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in pods:
        if not p.deleting:
            out[p.business] = out.get(p.business, 0) + 1
    return dict(sorted(out.items()))
