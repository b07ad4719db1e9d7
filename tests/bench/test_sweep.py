"""The vsim policy sweep: rate scales add phases, and `epp:default?k=v` reaches the scorer."""

from __future__ import annotations

import pytest

from bench.experiments import paired, speed_reset, sweep


def test_rate_scales_add_phases_and_variant_params_reach_the_scorer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--scenarios", "tiny", "--seeds", "0", "--jobs", "1", "--rate-scales", "1,2"]
    assert sweep.main([*args, "--routers", "round_robin,epp:default?workWeight=2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    assert [row.split("|")[2].strip() for row in rows] == ["20", "40"]  # tiny's rate, x1 and x2
    with pytest.raises(ValueError, match="workWeight"):  # the parameter got to the scorer
        sweep.main([*args, "--routers", "epp:default?workWeight=-1"])


def test_paired_runs_both_routers_on_each_schedule_and_bounds_the_difference(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--cells", "tiny@20", "--seeds", "0,1,2", "--jobs", "1"]
    assert paired.main([*args, "--base", "epp", "--alt", "epp:default"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert row and "+0.000 [+0.000, +0.000] | 0/3" in row[0]  # the same router: no difference
    assert paired.main([*args, "--base", "epp", "--alt", "round_robin"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    base, alt = (float(x) for x in row[0].split("|")[2:4])
    assert base != alt


def test_a_phase_runs_the_scenarios_own_request_count_unless_told() -> None:
    """Quality claims want >= 400 requests a phase; `--requests` gives a scenario more."""
    own = sweep._one(("tiny", "round_robin", 20.0, 0, None, None, None))
    more = sweep._one(("tiny", "round_robin", 20.0, 0, None, None, 2 * own["requests"]))
    assert more["requests"] == 2 * own["requests"] > 0


def test_the_bootstrap_interval_holds_the_mean_and_narrows_with_agreement() -> None:
    lo, hi = paired.bootstrap_mean_ci([-0.05, -0.04, -0.06, -0.05, -0.03])
    assert lo <= -0.046 <= hi < 0
    wide = paired.bootstrap_mean_ci([-0.5, 0.4, -0.6, 0.5, -0.03])
    assert wide[0] < 0 < wide[1]


def test_speed_reset_runs_the_three_modes_on_one_schedule(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert speed_reset.main(["tiny", "--rate", "20", "--at", "0.5", "--window", "3",
                             "--seeds", "0"]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["none", "reset", "adopt", "adopt - reset"]
    assert "nan" not in out[0]  # requests were sent in the window and answered
