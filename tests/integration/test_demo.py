"""`make run`'s launcher brings up the simulator pool, EPP and Envoy, and serves requests."""

from __future__ import annotations

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
