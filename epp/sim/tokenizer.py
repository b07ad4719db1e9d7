"""Deterministic tokenizer: a token is 1-4 non-space characters plus trailing whitespace.

Prefix-stable (a shared text prefix yields the same leading token ids), so prefix caching
is exact, and about 4 characters per token like a real BPE on English text. Generated
output tokens are words of at most 4 letters followed by a space, so a reply re-tokenizes
to the same ids when it is sent back in the next turn of a conversation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import xxhash

VOCAB_SIZE = 65_536
_TOKEN_RE = re.compile(r"\s+|\S{1,4}\s*")
# Deterministic reply vocabulary (each entry is one token when re-tokenized).
_REPLY_WORDS = (
    "the of and to in is it that for on was with he as you do at by this had not are but "
    "from or have an they one were her all she can use each how said time will up if out "
    "many then them so some make like him into has look two more go see way who its now "
    "find long down day did get come made may part"
)
OUTPUT_WORDS: tuple[str, ...] = tuple(w + " " for w in _REPLY_WORDS.split(" ") if len(w) <= 4)


def token_pieces(text: str) -> list[str]:
    return _TOKEN_RE.findall(text)


def piece_id(piece: str) -> int:
    return int(xxhash.xxh32_intdigest(piece.encode()) % VOCAB_SIZE)


def encode(text: str) -> list[int]:
    return [piece_id(p) for p in _TOKEN_RE.findall(text)]


def output_piece(seed: int, index: int) -> str:
    """The `index`-th generated token of a request whose reply seed is `seed`."""
    return OUTPUT_WORDS[(seed * 31 + index * 7 + (index * index) % 13) % len(OUTPUT_WORDS)]


def render_chat(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """A fixed chat template: `<|role|>\\n{content}\\n` per message, then `<|assistant|>\\n`."""
    parts: list[str] = []
    for m in messages:
        content = m.get("content", "")
        if isinstance(content, list):  # OpenAI content parts
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(f"<|{m.get('role', 'user')}|>\n{content}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)
