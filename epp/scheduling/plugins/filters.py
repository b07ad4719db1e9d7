"""Filters: business label, role, health/staleness. Model filtering is done by candidates."""

from __future__ import annotations

from epp import clock
from epp.datalayer.endpoint import (
    ROLE_BOTH,
    ROLE_DECODE,
    ROLE_PREFILL,
    UNASSIGNED_BUSINESS,
    Endpoint,
)
from epp.scheduling.framework import Filter
from epp.scheduling.request import CycleState, InferenceRequest


class BusinessFilter(Filter):
    """Keep endpoints whose `business` label matches the request's business.

    Parameters: `unassignedPolicy`: `strict` (default: a request for business X only goes to
    pods labelled X) or `overflow` (when no X pod is eligible, use `unassigned` pods).
    `requireBusiness`: when true, requests without a business only use `unassigned` pods;
    by default they may use any pod.
    """

    type_name = "business-filter"

    def configure(self) -> None:
        policy = str(self.params.get("unassignedPolicy", "strict"))
        if policy not in ("strict", "overflow"):
            raise ValueError(
                f"business-filter: unassignedPolicy must be strict or overflow, not {policy!r}"
            )
        self.overflow = policy == "overflow"
        self.require_business = bool(self.params.get("requireBusiness", False))

    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        business = request.business
        if not business:
            if self.require_business:
                return [ep for ep in endpoints if ep.business == UNASSIGNED_BUSINESS]
            return endpoints
        kept = [ep for ep in endpoints if ep.business == business]
        if not kept and self.overflow:
            kept = [ep for ep in endpoints if ep.business == UNASSIGNED_BUSINESS]
        return kept


class RoleFilter(Filter):
    """Keep endpoints able to play `role`: decode (decode, both, unlabelled) or prefill."""

    type_name = "role-filter"

    fixed_role: str | None = None  # set by the subclasses that name one role

    def configure(self) -> None:
        role = self.fixed_role or str(self.params.get("role", ROLE_DECODE))
        if role not in (ROLE_DECODE, ROLE_PREFILL, ROLE_BOTH):
            raise ValueError(f"role-filter: role must be decode, prefill or both, not {role!r}")
        self.role = role

    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        # (the roles compared inline, not through `Endpoint.can_*`: 1,000 endpoints a pick)
        if self.role == ROLE_PREFILL:
            return [ep for ep in endpoints if ep.role == ROLE_PREFILL or ep.role == ROLE_BOTH]
        if self.role == ROLE_DECODE:
            return [ep for ep in endpoints if ep.role != ROLE_PREFILL]
        return [ep for ep in endpoints if ep.role == ROLE_BOTH]


class DecodeFilter(RoleFilter):
    type_name = "decode-filter"
    fixed_role = ROLE_DECODE


class PrefillFilter(RoleFilter):
    type_name = "prefill-filter"
    fixed_role = ROLE_PREFILL


class HealthFilter(Filter):
    """Drop endpoints that are not ready, those known to be down (`Endpoint.health`: the
    scraper could not connect, the gateway had to retry elsewhere, a burst of 5xx), and those
    whose metrics have gone stale while others are fresh (a pod that stopped answering its
    /metrics is probably in trouble). Never filters every ready endpoint out: with none
    left, the request goes where it would have gone (and gets the gateway's answer)."""

    type_name = "health-filter"

    def configure(self) -> None:
        self.stale_after = float(self.params.get("staleAfterSeconds", 0.5))
        self.min_errors = int(self.params.get("minScrapeErrors", 3))

    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        now = clock.now()
        min_errors, stale_after = self.min_errors, self.stale_after
        # One pass for the usual case, some endpoint ready, up (`EndpointHealth.down`,
        # inline) and fresh: that is then the answer of the three steps below, each of
        # which keeps the previous one's list when it would leave none.
        kept = [
            ep
            for ep in endpoints
            if ep.ready
            and now >= ep.health.unreachable_until
            and now >= ep.health.cool_off_until
            and (ep.metrics.scrape_errors < min_errors or ep.metrics.age(now) <= stale_after)
        ]
        if kept:
            return kept
        ready = [ep for ep in endpoints if ep.ready]
        up = [ep for ep in ready if not ep.health.down(now)] or ready
        fresh = [
            ep
            for ep in up
            if ep.metrics.scrape_errors < min_errors or ep.metrics.age(now) <= stale_after
        ]
        return fresh or up
