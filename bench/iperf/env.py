"""`python -m bench.iperf.env`: the separate inference-perf venv and its offline tokenizer.

inference-perf needs Python >= 3.12 while the project runs on 3.11, so it lives in its own
venv (`.venv-iperf` by default): created with a 3.12+ interpreter, filled from
`bench/iperf/requirements.txt`, then a byte-level BPE tokenizer is trained offline
(`train_tokenizer.py`, on text shipped inside the installed inference-perf wheel) into
`<venv>/bpe-tokenizer`. Idempotent: an existing venv / tokenizer is reused.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
REQUIREMENTS = HERE / "requirements.txt"
TRAINER = HERE / "train_tokenizer.py"
DEFAULT_VENV = REPO / ".venv-iperf"

# Offline everywhere: the tokenizer is a local directory, nothing is fetched from a hub.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True, slots=True)
class IperfEnv:
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def inference_perf(self) -> Path:
        return self.venv / "bin" / "inference-perf"

    @property
    def tokenizer_dir(self) -> Path:
        return self.venv / "bpe-tokenizer"

    def ready(self) -> bool:
        return self.inference_perf.exists() and (self.tokenizer_dir / "tokenizer.json").exists()


def _version_ok(python: str) -> bool:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info >= (3, 12))"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "True"


def find_python312(explicit: str | None = None) -> str:
    """A Python >= 3.12: --python / $IPERF_PYTHON, then PATH, then pyenv's versions."""
    candidates: list[str] = []
    for c in (explicit, os.environ.get("IPERF_PYTHON")):
        if c:
            candidates.append(c)
    for name in ("python3.13", "python3.12"):
        found = shutil.which(name)
        if found:
            candidates.append(found)
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/3.1[2-9]*/bin/python"), reverse=True)
    for c in candidates:
        if _version_ok(c):
            return c
    raise SystemExit(
        "no Python >= 3.12 found: install one (e.g. `pyenv install 3.12`) or pass --python"
    )


def _run(argv: list[str]) -> None:
    print("+", " ".join(argv), flush=True)
    env = {**os.environ, **OFFLINE_ENV}
    subprocess.run(argv, check=True, env=env, timeout=1800)


def ensure(venv: Path = DEFAULT_VENV, python: str | None = None, *,
           vocab_size: int = 4000, force_tokenizer: bool = False) -> IperfEnv:
    e = IperfEnv(venv)
    if not e.python.exists():
        _run([find_python312(python), "-m", "venv", str(venv)])
    if not e.inference_perf.exists():
        _run([str(e.python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
        _run([str(e.python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)])
    if force_tokenizer or not (e.tokenizer_dir / "tokenizer.json").exists():
        _run([str(e.python), str(TRAINER), str(e.tokenizer_dir), "--vocab-size",
              str(vocab_size)])
    return e


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.iperf.env", description=__doc__)
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--python", default=None, help="interpreter >= 3.12 for the venv")
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--retrain", action="store_true", help="retrain the tokenizer")
    args = p.parse_args(argv)
    e = ensure(args.venv, args.python, vocab_size=args.vocab_size,
               force_tokenizer=args.retrain)
    print(f"inference-perf: {e.inference_perf}\ntokenizer: {e.tokenizer_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
