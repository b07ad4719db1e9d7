"""Fairness policies: which flow (tenant) of a priority band dispatches next.

Flows are the tenants of a band: the `x-gateway-inference-fairness-id` header, else the
request's business. Each flow carries a virtual `finish` time; dispatching from a flow
advances it by 1 / weight, and the flow with the smallest one goes next (stride
scheduling). A flow that was idle starts at the band's current virtual time, so idleness
earns no credit.

* `round-robin-fairness-policy`: every flow weight 1 — one dispatch each in turn;
* `weighted-fairness-policy`: parameters `weights: {flow: weight}`, `defaultWeight` (1):
  dispatches in proportion to the weights while the flows are backlogged;
* `global-strict-fairness-policy`: no fairness — the band behaves as one queue ordered by
  its ordering policy (the ecosystem's default);
* `work-fairness-policy`: like the weighted one, but a dispatch advances its flow by the
  work it brings (uncached prompt tokens, as the prefix index sees them, plus a per-request
  and a per-output-token part) instead of by 1: a tenant of cheap, cached requests is not
  held back to the request rate of a tenant of long fresh prompts that fill the pool. A
  request of a flow within its share of the work dispatched lately (nothing of it queued)
  goes straight to the best pod: only tenants over their share wait for room, so a lone
  tenant is never held (holding it would only add delay) and a flooding one is. A flow
  over its share that floods (sends over 1.5x its share of the pool's prefill capacity)
  also waits, while other flows are active, when it has used up its credit, even if pods
  have room: a token bucket filled at `shareOfCapacity` (default 1; 0 = off) times its
  weighted share of that capacity, holding 10 s of it. Pods do not preempt a prefill, so a
  flood allowed to fill every pod with room makes a light tenant wait behind it on every
  pod; a tenant sending about its share is never held by this (bench/RESULTS.md,
  multi_tenant).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

# Only a flooding tenant is held (see `Band.over_capacity_share`): held at exactly its share,
# a steady tenant beside it keeps its TTFT (bench/RESULTS.md, multi_tenant).
DEFAULT_SHARE_OF_CAPACITY = 1.0


class FlowView(Protocol):
    @property
    def flow_id(self) -> str: ...
    @property
    def finish(self) -> float: ...
    @property
    def order(self) -> int: ...  # activation order, the tie-breaker
    def head_key(self) -> tuple[float, int]: ...


class FairnessPolicy:
    type_name = ""

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        if params:
            raise ValueError(f"{self.type_name} takes no parameters")

    uses_work = False  # whether `cost` needs the request's work estimate
    # > 0: a flow over its share waits, while others are active, once its recent work
    # reaches this x its weighted share of the pool's prefill capacity (work fairness only:
    # its costs are in prefill tokens)
    capacity_share = 0.0
    # Whether a request of a flow within its share may skip the wait for a pod with room
    # (its turn would come first anyway).
    bypass_within_share = False

    def weight(self, flow_id: str) -> float:
        return 1.0

    def cost(self, ticket: Any) -> float:
        """How far a dispatch advances its flow's virtual time (before the weight)."""
        return 1.0

    def key(self, flow: FlowView) -> tuple[float, int]:
        """Sort key among the band's flows: the smallest dispatches next."""
        return (flow.finish, flow.order)


class RoundRobinFairness(FairnessPolicy):
    type_name = "round-robin-fairness-policy"


class WeightedFairness(FairnessPolicy):
    type_name = "weighted-fairness-policy"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        p = dict(params or {})
        unknown = set(p) - {"weights", "defaultWeight"}
        if unknown:
            raise ValueError(f"{self.type_name}: unknown parameter(s) {sorted(unknown)}")
        weights = p.get("weights") or {}
        if not isinstance(weights, dict):
            raise ValueError(f"{self.type_name}: weights must map flow ids to numbers")
        self.weights = {str(k): float(v) for k, v in weights.items()}
        self.default_weight = float(p.get("defaultWeight", 1.0))
        if self.default_weight <= 0 or any(w <= 0 for w in self.weights.values()):
            raise ValueError(f"{self.type_name}: weights must be positive")

    def weight(self, flow_id: str) -> float:
        return self.weights.get(flow_id, self.default_weight)


class WorkFairness(WeightedFairness):
    type_name = "work-fairness-policy"
    uses_work = True
    bypass_within_share = True

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        p = dict(params or {})
        share = p.pop("shareOfCapacity", DEFAULT_SHARE_OF_CAPACITY)
        super().__init__(p)
        try:
            self.capacity_share = float(share)
        except (TypeError, ValueError):
            raise ValueError(f"{self.type_name}: shareOfCapacity must be a number") from None
        if not self.capacity_share >= 0:
            raise ValueError(f"{self.type_name}: shareOfCapacity must not be negative")

    def cost(self, ticket: Any) -> float:
        return float(ticket.cost)


class GlobalStrictFairness(FairnessPolicy):
    type_name = "global-strict-fairness-policy"

    def key(self, flow: FlowView) -> tuple[float, int]:
        return flow.head_key()


FAIRNESS_POLICIES: dict[str, type[FairnessPolicy]] = {
    cls.type_name: cls
    for cls in (RoundRobinFairness, WeightedFairness, WorkFairness, GlobalStrictFairness)
}
