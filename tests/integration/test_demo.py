"""`make run`'s launcher brings up the simulator pool, EPP and Envoy, and serves requests."""

from __future__ import annotations

import re
import subprocess
import sys

from epp.devstack.procs import free_port


def test_demo_check_serves_requests() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "epp.devstack.demo", "--check", "--port", str(free_port()),
         "--base-ip", "127.0.6.2", "--time-scale", "0.2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(": 200 from 127.0.6.") == 3


def test_demo_pd_pool_disaggregates_a_long_prompt() -> None:
    """`make run PD=1:2`: a long fresh prompt is prefilled on the prefill pod and decoded
    behind a sidecar; a short one stays local (the demo's --check asserts both)."""
    out = subprocess.run(
        [sys.executable, "-m", "epp.devstack.demo", "--check", "--pd", "1:2",
         "--port", str(free_port()), "--base-ip", "127.0.6.20", "--time-scale", "0.2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    # Decode pods are 127.0.6.21 and .22 (the prefill pod is .20).
    assert re.search(r"check long: 200 from 127\.0\.6\.2[12]:", out.stdout), out.stdout
    assert "x-epp-pd=disaggregated" in out.stdout and "x-epp-pd=local" in out.stdout
