"""The Makefile's user-facing targets: `make image` picks a working container engine or says
why there is none; the image name it builds is the one the manifests, chart and samples use;
`make run PORT=...` and a busy port; `make test` reports skip reasons."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import yaml

import epp

REPO = Path(__file__).resolve().parents[2]


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-s", "--no-print-directory", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_version_and_image_name_agree() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    version = re.search(r'^version = "(.+)"$', pyproject, re.M)
    assert version and version.group(1) == epp.__version__
    assert make("print-image").stdout.strip() == epp.IMAGE == f"epp:{epp.__version__}"


def _images(doc: object) -> list[str]:
    if isinstance(doc, dict):
        return [v for k, v in doc.items() if k == "image" and isinstance(v, str)] + \
            [i for v in doc.values() for i in _images(v)]
    if isinstance(doc, list):
        return [i for v in doc for i in _images(v)]
    return []


def test_manifests_chart_and_samples_use_the_built_image() -> None:
    ours = []
    for path in sorted((REPO / "manifests").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            ours += [(path.name, i) for i in _images(doc) if i.split(":")[0].endswith("epp")]
    assert ours, "no manifest uses the epp image"
    assert {i for _, i in ours} == {epp.IMAGE}, ours
    for name in ("epp", "epp-reconciler"):
        chart = yaml.safe_load((REPO / f"charts/{name}/Chart.yaml").read_text())
        values = yaml.safe_load((REPO / f"charts/{name}/values.yaml").read_text())
        assert f"{values['image']['repository']}:{chart['appVersion']}" == epp.IMAGE, name


def _fake_engine(tmp_path: Path, name: str, info_ok: bool) -> Path:
    log = tmp_path / f"{name}.log"
    script = tmp_path / name
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n"
                      f"[ \"$1\" = info ] && {{ {'exit 0' if info_ok else 'echo daemon down >&2; exit 1'}; }}\n"
                      "exit 0\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return log


def test_make_image_says_why_no_engine_works(tmp_path: Path) -> None:
    _fake_engine(tmp_path, "dead-engine", info_ok=False)
    res = make("image", env={"CONTAINER_ENGINE": f"no-such-engine {tmp_path}/dead-engine"})
    assert res.returncode != 0
    assert "no working container engine" in res.stderr
    assert "no-such-engine: not installed" in res.stderr
    assert "dead-engine info' fails: daemon down" in res.stderr


def test_make_image_builds_with_the_first_working_engine(tmp_path: Path) -> None:
    _fake_engine(tmp_path, "dead-engine", info_ok=False)
    log = _fake_engine(tmp_path, "live-engine", info_ok=True)
    res = make("image", env={"CONTAINER_ENGINE": f"{tmp_path}/dead-engine {tmp_path}/live-engine"})
    assert res.returncode == 0, res.stderr
    assert log.read_text().splitlines() == ["info", f"build -f Containerfile -t {epp.IMAGE} ."]


def test_make_run_port_and_test_flags() -> None:
    assert "--port 8123" in make("-n", "run", "PORT=8123").stdout
    assert "-rs" in make("-n", "test-unit").stdout


def test_demo_reports_a_busy_port_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "epp.devstack.demo", "--port", str(port),
                              "--check"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"127.0.0.1:{port}" in err and f"make run PORT={port + 1}" in err


def test_scripts_pass_shellcheck() -> None:
    scripts = sorted(str(p) for p in (REPO / "hack").rglob("*.sh"))
    shellcheck = Path(sys.executable).parent / "shellcheck"
    res = subprocess.run([str(shellcheck), *scripts], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout
