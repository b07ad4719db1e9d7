"""The simulator's tokenizer: a real byte-level BPE (`tokenizers`) with a ChatML template.

The tokenizer directory ships in the package (`epp/sim/data/tokenizer/`, built by
`python -m epp.sim.build_tokenizer`); point the EPP's `--tokenizer-dir` at the same
directory and both compute the same token ids for a request. Prompts are tokenized the way
vLLM does: a chat request renders the template with `add_generation_prompt` and is encoded
without special tokens; a completion prompt is encoded with them. Repeated prefixes are
served from the tokenizer's chunk cache.

Generated output tokens are reply words with a leading space (" the", " of", ...), each one
token, so a reply sent back in the next turn of a conversation re-tokenizes to the ids that
were generated.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from epp.tokenization import ModelTokenizer, load_tokenizer

DATA_DIR = Path(__file__).parent / "data" / "tokenizer"

# Deterministic reply vocabulary (each entry is one token of the shipped tokenizer).
_REPLY_WORDS = (
    "the of and to in is it that for on was with he as you do at by this had not are but "
    "from or have an they one were her all she can use each how said time will up if out "
    "many then them so some make like him into has look two more go see way who its now "
    "find long down day did get come made may part"
)
OUTPUT_WORDS: tuple[str, ...] = tuple(" " + w for w in _REPLY_WORDS.split(" ") if len(w) <= 4)


@functools.cache
def sim_tokenizer() -> ModelTokenizer:
    return load_tokenizer(DATA_DIR)


@functools.cache
def _output_ids() -> dict[str, int]:
    tok = sim_tokenizer()
    out: dict[str, int] = {}
    for w in OUTPUT_WORDS:
        ids = tok.encode(w)
        if len(ids) != 1:
            raise RuntimeError(f"reply word {w!r} is not one token of {DATA_DIR}")
        out[w] = ids[0]
    return out


def vocab_size() -> int:
    return int(sim_tokenizer()._tok.get_vocab_size())


def encode(text: str, add_special_tokens: bool = False) -> list[int]:
    return sim_tokenizer().encode(text, add_special_tokens)


def piece_id(piece: str) -> int:
    """The token id of a generated piece (one of OUTPUT_WORDS)."""
    return _output_ids()[piece]


def output_piece(seed: int, index: int) -> str:
    """The `index`-th generated token of a request whose reply seed is `seed`."""
    return OUTPUT_WORDS[(seed * 31 + index * 7 + (index * index) % 13) % len(OUTPUT_WORDS)]


def render_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    return sim_tokenizer().render_chat(messages, add_generation_prompt=add_generation_prompt)


def request_ids(api: str, body: Mapping[str, Any]) -> list[int] | None:
    """Prompt token ids of an OpenAI request body, as vLLM computes them."""
    return sim_tokenizer().request_ids(api, body)
