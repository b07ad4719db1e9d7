"""Filters: business (strict / overflow), role, health and metric staleness."""

from __future__ import annotations

import time

import pytest

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.config import ConfigError, build_scheduler
from epp.scheduling.framework import Filter
from epp.scheduling.plugins.filters import (
    BusinessFilter,
    DecodeFilter,
    HealthFilter,
    PrefillFilter,
    RoleFilter,
)
from epp.scheduling.request import CycleState, InferenceRequest


def ep(n: int, business: str = "unassigned", role: str = "", ready: bool = True) -> Endpoint:
    return Endpoint(f"127.0.0.{n}", 8000, business=business, role=role, ready=ready)


def run(f: Filter, endpoints: list[Endpoint], business: str | None = None) -> list[int]:
    r = InferenceRequest(request_id="r", model="m", business=business)
    return [int(e.address.rsplit(".", 1)[1]) for e in f.filter(CycleState(), r, endpoints)]


POOL = [ep(1, "a"), ep(2, "a"), ep(3, "b"), ep(4), ep(5)]


def test_business_strict() -> None:
    f = BusinessFilter()
    assert run(f, POOL, "a") == [1, 2]
    assert run(f, POOL, "b") == [3]
    assert run(f, POOL, "c") == []  # strict: no overflow to unassigned pods
    assert run(f, POOL, None) == [1, 2, 3, 4, 5]  # no business: any pod


def test_business_overflow_uses_unassigned_only_when_needed() -> None:
    f = BusinessFilter("", {"unassignedPolicy": "overflow"})
    assert run(f, POOL, "a") == [1, 2]  # own pods exist: no overflow
    assert run(f, POOL, "c") == [4, 5]  # none: unassigned pods
    assert run(f, [ep(1, "a")], "c") == []  # nothing unassigned either


def test_business_require_business() -> None:
    f = BusinessFilter("", {"requireBusiness": True})
    assert run(f, POOL, None) == [4, 5]
    assert run(f, POOL, "a") == [1, 2]


def test_business_bad_policy_rejected_by_plugin_and_config() -> None:
    with pytest.raises(ValueError, match="unassignedPolicy"):
        BusinessFilter("", {"unassignedPolicy": "sometimes"})
    cfg = """
plugins:
- type: business-filter
  parameters: {unassignedPolicy: sometimes}
"""
    with pytest.raises(ConfigError, match="unassignedPolicy"):
        build_scheduler(cfg)


ROLES = [ep(1, role="prefill"), ep(2, role="decode"), ep(3, role="both"), ep(4, role="")]
ROLES.append(ep(5, role="prefill-decode"))


def test_role_filters() -> None:
    assert run(DecodeFilter(), ROLES) == [2, 3, 4, 5]  # unlabelled pods decode
    assert run(PrefillFilter(), ROLES) == [1, 3, 5]  # unlabelled pods never prefill
    assert run(RoleFilter("", {"role": "both"}), ROLES) == [3, 5]
    assert run(RoleFilter(), ROLES) == [2, 3, 4, 5]
    # decode/prefill filters ignore a contradicting parameter
    assert run(DecodeFilter("", {"role": "prefill"}), ROLES) == [2, 3, 4, 5]
    with pytest.raises(ValueError):
        RoleFilter("", {"role": "encode"})


def _health(ready: bool, age: float | None, errors: int, n: int) -> Endpoint:
    e = ep(n, ready=ready)
    if age is not None:
        e.metrics.updated_at = time.monotonic() - age
    e.metrics.scrape_errors = errors
    return e


def test_health_drops_not_ready_and_stale_failing() -> None:
    f = HealthFilter("", {"staleAfterSeconds": 2.0, "minScrapeErrors": 3})
    pool = [
        _health(True, 0.1, 0, 1),  # fresh
        _health(False, 0.1, 0, 2),  # not ready
        _health(True, 30.0, 5, 3),  # stale and failing scrapes
        _health(True, 30.0, 1, 4),  # stale but few errors: a slow scrape, kept
        _health(True, None, 0, 5),  # never scraped, no errors (just added): kept
        _health(True, 0.5, 9, 6),  # errors but recent data: kept
    ]
    assert run(f, pool) == [1, 4, 5, 6]


def test_health_never_empties_for_staleness_alone() -> None:
    f = HealthFilter()
    pool = [_health(True, 60.0, 10, 1), _health(True, None, 4, 2), _health(False, 0.1, 0, 3)]
    assert run(f, pool) == [1, 2]  # all ready ones are stale: keep them rather than nothing
    assert run(f, [_health(False, 0.1, 0, 1)]) == []  # not-ready ones do go
