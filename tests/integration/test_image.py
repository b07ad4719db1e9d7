"""The container image, as far as it can be checked without a container engine (none runs
here): the Containerfile lints clean with hadolint, its build context is what .dockerignore
lets through, and its install step (`pip install .` of exactly the COPY'd files into a
fresh venv) gives a working `epp` for serve, reconcile, sim and render. `make image` itself
is exercised in tests/unit/test_makefile.py (it must say clearly when no engine works)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from epp.devstack.procs import free_port

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = REPO / "Containerfile"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not installed: it is a dev dependency (pip install -e '.[dev]')")
    return path


def test_containerfile_lints_clean() -> None:
    res = subprocess.run([_tool("hadolint"), "--no-color", str(CONTAINERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_containerfile_runs_as_non_root_with_epp_entrypoint() -> None:
    text = CONTAINERFILE.read_text()
    final = text[text.rindex("\nFROM "):]
    assert re.search(r"^USER 65532:65532$", final, re.M)
    assert 'ENTRYPOINT ["epp"]' in final
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+-slim", text, re.M)


def copied_sources() -> list[str]:
    """The build-stage COPY sources (relative to the build context)."""
    out: list[str] = []
    for line in CONTAINERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            out += line.split()[1:-1]
    return out


def test_dockerignore_lets_through_exactly_what_is_copied() -> None:
    allowed = [ln[1:].rstrip("/") for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.startswith("!")]
    assert sorted(allowed) == sorted(s.rstrip("/") for s in copied_sources())


def test_install_step_in_a_fresh_venv(tmp_path: Path) -> None:
    ctx = tmp_path / "context"
    ctx.mkdir()
    for src in copied_sources():
        path = REPO / src
        if path.is_dir():
            shutil.copytree(path, ctx / src, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, ctx / src)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = subprocess.run([str(venv / "bin/pip"), "install", "-q", "."], cwd=ctx, env=env,
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    shutil.rmtree(ctx)  # nothing may come from the build context any more
    epp = str(venv / "bin/epp")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([epp, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)

    for cmd in ("serve", "reconcile", "render", "pool", "sim"):
        res = run(cmd, "--help")
        assert res.returncode == 0 and "usage: epp " + cmd in res.stdout, res.stderr
    where = subprocess.run([str(venv / "bin/python"), "-c", "import epp; print(epp.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert str(venv) in where.stdout, where.stdout  # the installed copy, not the checkout
    rendered = run("render", "-f", str(REPO / "manifests/samples/modelpool-sim.yaml"))
    assert rendered.returncode == 0 and "kind: InferencePool" in rendered.stdout, rendered.stderr

    # `epp sim` needs its packaged tokenizer data: start one and ask it for a completion.
    port = free_port()
    sim = subprocess.Popen([epp, "sim", "--port", str(port), "--model", "m", "--preset",
                            "instant"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert sim.stdout is not None
        for line in sim.stdout:
            if b"READY" in line:
                break
        else:
            pytest.fail("epp sim exited before READY")
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", method="POST",
            data=b'{"model": "m", "prompt": "hello there", "max_tokens": 3}',
            headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200 and b'"usage"' in resp.read()
    finally:
        sim.terminate()
        sim.wait(10)
