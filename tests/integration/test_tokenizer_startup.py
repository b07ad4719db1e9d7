"""`epp serve` refuses to start with a precise prefix config and an unusable tokenizer, and
says why (a clear startup error, not a crash at the first request)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from epp.devstack.procs import free_port
from tests.integration.conftest import ROOT

CONFIG = """
plugins:
- type: precise-prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: precise-prefix-cache-scorer
"""


def serve(*extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epp.cli", "serve", "--endpoint", "127.0.0.1:9",
         "--grpc-port", str(free_port()), "--grpc-health-port", str(free_port()),
         "--metrics-port", str(free_port()), "--config-text", CONFIG, "--log-format", "text",
         *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_missing_or_broken_tokenizer_is_a_clear_startup_error(tmp_path: Path) -> None:
    missing = serve("--tokenizer-dir", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert "does not exist" in missing.stdout + missing.stderr
    (tmp_path / "tokenizer.json").write_text("{broken")
    broken = serve("--tokenizer-dir", str(tmp_path))
    assert broken.returncode == 2
    assert "tokenizer.json cannot be loaded" in broken.stdout + broken.stderr
    none = serve()
    assert none.returncode == 2
    assert "--tokenizer-dir" in none.stdout + none.stderr
