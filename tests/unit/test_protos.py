"""The generated code in epp/sync/v1 is what `make protos` produces from protos/ with the
pinned grpcio-tools: regenerate into a temp folder and compare byte for byte."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ["sync_pb2.py", "sync_pb2.pyi", "sync_pb2_grpc.py"]


def pinned_tools() -> str:
    m = re.search(r'"grpcio-tools==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert m, "grpcio-tools must be pinned exactly in pyproject.toml"
    return m.group(1)


def test_grpcio_tools_is_the_pinned_version() -> None:
    assert version("grpcio-tools") == pinned_tools(), "reinstall: make venv"


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         "protos/epp/sync/v1/sync.proto"],
        cwd=ROOT, check=True,
    )  # fmt: skip
    for name in GENERATED:
        fresh = (tmp_path / "epp/sync/v1" / name).read_bytes()
        committed = (ROOT / "epp/sync/v1" / name).read_bytes()
        assert fresh == committed, f"epp/sync/v1/{name} is stale: run `make protos`"
