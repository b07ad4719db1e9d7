"""Business distribution planning and status conditions (pure)."""

from __future__ import annotations

from collections import Counter

import pytest

from epp.api.modelpool import Business, RouteMatch
from epp.reconcile import status
from epp.reconcile.distribution import Move, PodInfo, counts, plan, role_targets


def B(name: str, replicas: int | None = None, share: int | None = None) -> Business:
    return Business(name=name, replicas=replicas, share=share, match=RouteMatch(path=f"/{name}"))


def pods(*labels: str, role: str = "decode", ready: bool = True) -> list[PodInfo]:
    return [PodInfo(f"{role}-{i}", role, b, ready, f"2024-01-01T00:00:{i:02d}Z")
            for i, b in enumerate(labels)]


def apply(ps: list[PodInfo], moves: list[Move]) -> list[PodInfo]:
    by = {m.pod: m for m in moves}
    out = []
    for p in ps:
        m = by.get(p.name)
        assert m is None or m.source == p.business
        out.append(PodInfo(p.name, p.role, m.target if m else p.business, p.ready, p.created,
                           p.deleting, p.pinned))
    return out


@pytest.mark.parametrize(("n", "expect"), [
    (4, {"prod": 3, "test": 1, "unassigned": 0}),
    (2, {"prod": 2, "test": 0, "unassigned": 0}),
    (7, {"prod": 3, "test": 4, "unassigned": 0}),
])
def test_targets_fixed_then_share(n: int, expect: dict[str, int]) -> None:
    assert role_targets(n, [B("prod", replicas=3), B("test", share=1)]) == expect


def test_targets_largest_remainder_and_leftover() -> None:
    assert role_targets(5, [B("a", share=1), B("b", share=1), B("c", share=1)]) == \
        {"a": 2, "b": 2, "c": 1, "unassigned": 0}
    assert role_targets(5, [B("a", replicas=1), B("b", replicas=2)]) == \
        {"a": 1, "b": 2, "unassigned": 2}


def test_plan_from_unassigned_and_idempotent() -> None:
    bs = [B("prod", replicas=3), B("test", share=1)]
    ps = pods(*["unassigned"] * 4)
    moves = plan(ps, bs)
    after = apply(ps, moves)
    assert counts(after) == {"prod": 3, "test": 1}
    assert plan(after, bs) == []


def test_plan_moves_minimum_and_prefers_not_ready_newest() -> None:
    late = PodInfo("late", "decode", "prod", False, "2024-01-02T00:00:00Z")
    ps = [*pods("prod", "prod", "prod", "test"), late]
    moves = plan(ps, [B("prod", replicas=2), B("test", share=1)])
    assert len(moves) == 2
    assert moves[0].pod == "late" or moves[1].pod == "late"
    assert all(m.source == "prod" and m.target == "test" for m in moves)


def test_plan_per_role_and_ignores_deleting_and_pinned() -> None:
    ps = pods("unassigned", "unassigned", role="prefill") + pods("x", "x", "unassigned")
    ps.append(PodInfo("dying", "decode", "unassigned", True, "", deleting=True))
    ps.append(PodInfo("pin", "decode", "test", True, "", pinned=True))
    moves = plan(ps, [B("prod", share=1), B("test", share=1)])
    assert "dying" not in {m.pod for m in moves} and "pin" not in {m.pod for m in moves}
    after = apply(ps, moves)
    by_role = Counter((p.role, p.business) for p in after if not p.deleting)
    assert by_role[("prefill", "prod")] == 1 and by_role[("prefill", "test")] == 1
    # 4 live decode pods: 2 prod, 2 test (the pinned one counts for test); removed business
    # label `x` is cleared
    assert by_role[("decode", "prod")] == 2 and by_role[("decode", "test")] == 2


def test_status_conditions_follow_readiness_and_keep_transition_time() -> None:
    dep = {"metadata": {"generation": 2}, "spec": {"replicas": 2},
           "status": {"observedGeneration": 2, "replicas": 2, "readyReplicas": 1,
                      "updatedReplicas": 2}}
    obs = status.Observed(generation=5, desired={"decode": 2}, deployments={"decode": dep},
                          businesses={"unassigned": 2})
    s1 = status.compute(obs, {})
    conds = {c["type"]: c for c in s1["conditions"]}
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "ReplicasNotReady"
    assert conds["Progressing"]["status"] == "True"
    assert s1["observedGeneration"] == 5 and s1["roles"]["decode"]["readyReplicas"] == 1
    dep["status"]["readyReplicas"] = 2
    s2 = status.compute(obs, s1)
    c2 = {c["type"]: c for c in s2["conditions"]}
    assert c2["Ready"]["status"] == "True" and c2["Progressing"]["status"] == "False"
    assert c2["Degraded"]["lastTransitionTime"] == conds["Degraded"]["lastTransitionTime"]
    assert status.compute(obs, s2) == s2  # unchanged input -> identical status (no write)
    bad = status.Observed(generation=6, desired={}, problem=("InvalidSpec", "boom"))
    c3 = {c["type"]: c for c in status.compute(bad, s2)["conditions"]}
    assert c3["Degraded"]["status"] == "True" and c3["Degraded"]["reason"] == "InvalidSpec"
