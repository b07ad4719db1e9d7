"""The vsim policy sweep: rate scales add phases, and `epp:default?k=v` reaches the scorer."""

from __future__ import annotations

import pytest

from bench.experiments import sweep


def test_rate_scales_add_phases_and_variant_params_reach_the_scorer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--scenarios", "tiny", "--seeds", "0", "--jobs", "1", "--rate-scales", "1,2"]
    assert sweep.main([*args, "--routers", "round_robin,epp:default?workWeight=2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    assert [row.split("|")[2].strip() for row in rows] == ["20", "40"]  # tiny's rate, x1 and x2
    with pytest.raises(ValueError, match="workWeight"):  # the parameter got to the scorer
        sweep.main([*args, "--routers", "epp:default?workWeight=-1"])
