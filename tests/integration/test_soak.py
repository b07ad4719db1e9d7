"""The 3-minute soak (`make soak` runs 30 minutes): pod kills, endpoint churn, KV-event
publisher restarts and client cancels under steady load; no leak, no unexplained failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import run_soak

pytestmark = [pytest.mark.integration, pytest.mark.soak]


@pytest.mark.timeout(420)
async def test_three_minute_soak(tmp_path: Path) -> None:
    rep = await run_soak(
        duration=180,
        rate=8,
        n_pods=4,
        kill_every=50,
        down_for=8,
        churn_every=40,
        warmup=45,
        workdir=tmp_path,
    )
    assert rep.kills >= 3 and rep.churns >= 3, rep
    assert rep.requests >= 0.9 * 180 * 8, rep
    assert rep.ok >= 0.8 * rep.requests, rep
    assert rep.violations == [], (rep.violations, rep.failures[:10])
