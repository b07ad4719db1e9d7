"""A model's tokenizer from a local Hugging Face directory, with a cache for shared prefixes.

`load_tokenizer(dir)` reads `tokenizer.json` (the Rust `tokenizers` library) and the chat
template from `tokenizer_config.json` (or `chat_template.jinja` / `chat_template.json`).
Nothing is fetched from a hub.

Requests that share a prefix (a system prompt, a conversation's history) should not pay for
tokenizing it again. Long texts are cut into chunks of about `chunk_chars` characters that
end between two words (`letter␠letter`): with the pre-tokenizers of byte-level BPE
tokenizers (GPT-2, Llama 3, Qwen, ...) no token crosses such a point, so the token ids of
the whole text are the concatenation of the chunks' ids. A chunk also ends where a special
token starts (`<|im_end|>`, ...: the tokenizer splits there first), so a chat's system
message ends a chunk and stays cached whatever the user message after it. Each chunk's ids
are cached under a chained hash of the text up to its end. Chunking is enabled only for
tokenizers whose normalizer and pre-tokenizer are of those kinds and that pass a self-test
at load (whole versus chunked encodings of probe texts); otherwise every text is encoded
whole.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash
from tokenizers import Tokenizer

from epp.tokenization.chat import ChatTemplate, ChatTemplateError

log = logging.getLogger(__name__)

_hash = xxhash.xxh3_64_intdigest
Mark = tuple[int, int]  # (key of the text up to a chunk's end, ids up to there)
_SPECIAL_SALT = 0x9E3779B97F4A7C15
_uids = itertools.count(1)
# Fresh text shorter than this is encoded on the calling thread: below it the Rust thread
# pool's hand-off and wake-ups cost more than the second core saves, and widen the tail
# (bench/RESULTS.md §1).
PARALLEL_MIN_CHARS = 8192
# A point between two words: no token of a byte-level BPE pre-tokenizer crosses it.
_BOUNDARY = re.compile(r"(?<=[A-Za-z]) (?=[A-Za-z])")
_SAFE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "StripAccents"}
_SAFE_PRETOKENIZERS = {
    "ByteLevel",
    "Split",
    "Digits",
    "Punctuation",
    "Whitespace",
    "WhitespaceSplit",
}
_PROBES = (
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?  Twice  spaced\n"
    "new line and\ttabs;  numbers 1234567 and unicode café naïve résumé, done.",
    "kalo mine ruta vozi pedu sofa kalo mine ruta vozi pedu sofa user: what is up",
    "def f(x):\n    return x * 2  # comment here\n\nclass A B C d e f g h i j k l m",
)


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be used (missing or broken files)."""


@dataclass(slots=True)
class TokenizerStats:
    chunk_hits: int = 0
    chunk_misses: int = 0
    tokens_from_cache: int = 0
    tokens_encoded: int = 0
    chars_encoded: int = 0


@dataclass(slots=True)
class _ChunkCache:
    max_tokens: int
    entries: OrderedDict[int, list[int]] = field(default_factory=OrderedDict)
    tokens: int = 0

    def get(self, key: int) -> list[int] | None:
        ids = self.entries.get(key)
        if ids is not None:
            self.entries.move_to_end(key)
        return ids

    def put(self, key: int, ids: list[int]) -> None:
        if key in self.entries:
            return
        self.entries[key] = ids
        self.tokens += len(ids)
        while self.tokens > self.max_tokens and self.entries:
            _, old = self.entries.popitem(last=False)
            self.tokens -= len(old)


class PartialIds:
    """A prompt's token ids known so far: `ids` is a prefix of the full ids (all of them
    once `complete`), `marks` as `ModelTokenizer.encode` gives them for that prefix."""

    __slots__ = (
        "_chars",
        "_keys",
        "_parts",
        "_peeked",
        "_pos",
        "_salt",
        "_suffix",
        "_texts",
        "_tok",
        "complete",
        "ids",
        "marks",
    )  # fmt: skip

    def __init__(
        self, tok: ModelTokenizer, ids: list[int], marks: list[Mark], *, complete: bool
    ) -> None:
        self.ids = ids
        self.marks = marks
        self.complete = complete
        self._tok = tok
        self._parts: list[list[int] | None] = []
        self._keys: list[int] = []
        self._texts: list[str] = []
        self._pos = 0  # the first chunk not in `ids` yet
        self._salt = 0
        self._suffix: list[int] = []
        self._chars = 0  # characters of the chunks in `ids`
        self._peeked: tuple[int, list[int]] | None = None  # see `peek`

    def more(self, chunks: int = 1) -> None:
        """Encode the next `chunks` chunks not cached (all: a large number) and extend
        `ids` over them and the cached chunks after them."""
        if self.complete:
            return
        parts = self._parts
        missing = [i for i in range(self._pos, len(parts)) if parts[i] is None][:chunks]
        if self._peeked is not None and missing:  # the first starts with the peeked piece
            self._tok._fill_peeked(missing.pop(0), self._peeked, parts, self._keys, self._texts)
            self._peeked = None
        self._tok._fill(missing, parts, self._keys, self._texts)
        self._advance()

    def finish(self) -> None:
        """Encode everything not cached yet: `ids` is the whole prompt's."""
        self.more(len(self._parts))

    def peek(self, tokens: int) -> list[int] | None:
        """At least `tokens` ids past `ids`, from a short piece at the start of the next
        chunk not encoded yet, ending between two words; not taken into `ids` (a later
        `peek` extends the piece, `more` encodes only the rest of that chunk). For a
        caller that needs only the next few ids to decide whether to encode further
        (bench/RESULTS.md §1, "Peek"). None when complete, or when the piece would be
        most of the chunk (then `more` costs about the same)."""
        per_char = 0.0 if self.complete else self._tokens_per_char()
        if per_char <= 0.0:
            return None
        text = self._texts[self._pos]
        end, ids = self._peeked or (0, [])
        while len(ids) < tokens:
            # a quarter more characters than the head's rate says: mostly one try
            m = _BOUNDARY.search(text, end + int(1.25 * (tokens - len(ids) + 2) / per_char) + 8)
            if m is None or 2 * m.start() > len(text):
                return None
            ids = ids + self._tok._encode_here(text[end : m.start()])
            end = m.start()
            self._peeked = (end, ids)
        return ids

    def rest_estimate(self) -> int:
        """Tokens not in `ids` yet, estimated from their characters at the rate of the
        prompt's known head (or of everything this tokenizer encoded, for a short head)."""
        if self.complete:
            return 0
        chars = sum(len(t) for t in self._texts[self._pos :])
        return round(chars * self._tokens_per_char()) + len(self._suffix)

    def _tokens_per_char(self) -> float:
        """The prompt's known head's (or everything this tokenizer encoded, for a short
        head)."""
        return len(self.ids) / self._chars if self._chars >= 64 else self._tok.tokens_per_char()

    def _advance(self) -> None:
        parts, ids, marks, salt = self._parts, self.ids, self.marks, self._salt
        i = self._pos
        while i < len(parts):
            p = parts[i]
            if p is None:
                break
            ids += p
            marks.append((self._keys[i] ^ salt, len(ids)))
            self._chars += len(self._texts[i])
            i += 1
        self._pos = i
        if i == len(parts):
            ids += self._suffix
            self.complete = True
            self._parts, self._keys, self._texts = [], [], []


class ModelTokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        config: Mapping[str, Any] | None = None,
        *,
        source: str = "",
        chat_template: str | None = None,
        chunk_chars: int = 1024,
        cache_tokens: int = 2_000_000,
        tokenizer_json: Mapping[str, Any] | None = None,
    ) -> None:
        self.source = source
        self._uid = _hash(f"{next(_uids)}:{source}".encode())  # marks of two tokenizers differ
        self._tok = tokenizer
        self.config = dict(config or {})
        self.chunk_chars = max(16, chunk_chars)
        self._cache = _ChunkCache(cache_tokens)
        self.stats = TokenizerStats()
        self._batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        special = {
            k: v
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (v := _token_text(self.config.get(k))) is not None
        }
        template = chat_template if chat_template is not None else _config_template(self.config)
        self.chat: ChatTemplate | None = ChatTemplate(template, special) if template else None
        self._prefix_ids, self._suffix_ids, self._specials_known = self._special_wrapping()
        # Chunks also end where a special token starts (the tokenizer splits the text
        # there before anything else), so a chat's system message ends a chunk and stays
        # cached when the user message after it changes.
        self._specials = self._special_texts()
        self._special_at = (
            re.compile("|".join(map(re.escape, self._specials))).search if self._specials else None
        )
        # The character every special token starts with, when they share one ("<" for
        # `<|im_start|>`, `<s>`, ...): a chunk without it needs no regex search.
        leads = {t[0] for t in self._specials}
        self._special_lead = leads.pop() if len(leads) == 1 else ""
        self.chunking = self._chunking_safe(tokenizer_json)

    # ---- encoding --------------------------------------------------------------------------
    def encode(
        self, text: str, add_special_tokens: bool = False, marks: list[Mark] | None = None
    ) -> list[int]:
        """Token ids of `text`, exactly as `tokenizer.encode(text).ids` would give them.

        `marks`, if given, receives one (key, end) per cached chunk: `end` is the number of
        ids up to the chunk's end, `key` names the whole text up to there (and the special
        tokens added), so work derived from those ids can be cached under it."""
        part = self.encode_partial(text, add_special_tokens)
        part.finish()
        if marks is not None:
            marks.extend(part.marks)
        return part.ids

    def _encode_here(self, text: str) -> list[int]:
        """`text` encoded alone, on the calling thread: a short prompt, a text this
        tokenizer cannot chunk, or a piece of a chunk (`PartialIds.peek`)."""
        ids = list(self._batch([text], add_special_tokens=False)[0].ids)
        self.stats.tokens_encoded += len(ids)
        self.stats.chars_encoded += len(text)
        return ids

    def _fill_peeked(
        self,
        i: int,
        peeked: tuple[int, list[int]],
        parts: list[list[int] | None],
        keys: Sequence[int],
        texts: Sequence[str],
    ) -> None:
        """Encode chunk `i` whose leading piece `PartialIds.peek` encoded (characters, ids)
        and cache its ids: the piece ends between two words, so the rest encodes alone."""
        chars, head = peeked
        ids = head + self._encode_here(texts[i][chars:])
        self._cache.put(keys[i], ids)
        parts[i] = ids
        self.stats.chunk_misses += 1

    def _split(self, text: str) -> tuple[list[list[int] | None], list[int], list[str]]:
        """The text's chunks: their cached ids (None where not cached), their keys (a
        chained hash of the text up to the chunk's end) and their texts."""
        step = self.chunk_chars
        n = len(text)
        # `_ChunkCache.get` inline (the walk visits ~500 chunks of a 100k-token prompt)
        entries = self._cache.entries
        cached, touch = entries.get, entries.move_to_end
        search = _BOUNDARY.search
        parts: list[list[int] | None] = []
        keys: list[int] = []
        texts: list[str] = []
        pos = 0
        h = 0
        special = self._special_at
        lead = self._special_lead
        find = text.find
        while pos < n:
            m = search(text, pos + step) if pos + step < n else None
            end = m.start() if m is not None else n
            if special is not None and (not lead or find(lead, pos + 1, end) >= 0):
                sm = special(text, pos + 1, end)
                if sm is not None:
                    end = sm.start()
            chunk = text[pos:end]
            h = _hash(chunk.encode(), h)
            got = cached(h)
            if got is not None:
                touch(h)
            keys.append(h)
            texts.append(chunk)
            parts.append(got)
            pos = end
        hits = [p for p in parts if p is not None]
        self.stats.chunk_hits += len(hits)
        self.stats.tokens_from_cache += sum(map(len, hits))
        return parts, keys, texts

    def _fill(
        self,
        missing: Sequence[int],
        parts: list[list[int] | None],
        keys: Sequence[int],
        texts: Sequence[str],
    ) -> None:
        """Encode the chunks at `missing` (indexes into `parts`) and cache their ids."""
        if not missing:
            return
        chunks = [texts[i] for i in missing]
        chars = sum(map(len, chunks))
        if chars >= PARALLEL_MIN_CHARS:
            encoded = self._batch(chunks, add_special_tokens=False)
        else:  # on this thread: handing a small batch to the thread pool costs more
            encoded = [self._batch([c], add_special_tokens=False)[0] for c in chunks]
        st = self.stats
        cache = self._cache
        for i, enc in zip(missing, encoded, strict=True):
            ids = list(enc.ids)
            cache.put(keys[i], ids)
            parts[i] = ids
            st.tokens_encoded += len(ids)
        st.chars_encoded += chars
        st.chunk_misses += len(missing)

    def tokens_per_char(self) -> float:
        """Tokens per character of the text encoded so far (0.25 before any)."""
        st = self.stats
        return st.tokens_encoded / st.chars_encoded if st.chars_encoded > 1000 else 0.25

    def encode_partial(self, text: str, add_special_tokens: bool = False) -> PartialIds:
        """The text's leading ids that cost no encoding (cached chunks), extended on demand
        (`PartialIds.more`): a caller that needs only the prompt's head, as far as some
        engine may have cached it, does not pay for encoding a long fresh tail."""
        if add_special_tokens and not self._specials_known:
            ids = list(self._tok.encode(text, add_special_tokens=True).ids)
            return PartialIds(self, ids, [], complete=True)
        prefix = self._prefix_ids if add_special_tokens else []
        suffix = self._suffix_ids if add_special_tokens else []
        if not self.chunking or len(text) < 2 * self.chunk_chars:
            ids = [*prefix, *self._encode_here(text), *suffix]
            return PartialIds(self, ids, [], complete=True)
        parts, keys, texts = self._split(text)
        salt = (_SPECIAL_SALT if add_special_tokens else 0) ^ self._uid
        out = PartialIds(self, list(prefix), [], complete=False)
        out._parts, out._keys, out._texts = parts, keys, texts
        out._salt, out._suffix = salt, suffix
        out._advance()
        return out

    def token_to_id(self, token: str) -> int | None:
        tid: int | None = self._tok.token_to_id(token)
        return tid

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self._tok.decode(list(ids), skip_special_tokens=False)
        return text

    # ---- requests ----------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
        if self.chat is None:
            raise ChatTemplateError(f"{self.source or 'tokenizer'} has no chat template")
        return self.chat.render(messages, **kwargs)

    def request_ids(
        self, api: str, body: Mapping[str, Any], marks: list[Mark] | None = None
    ) -> list[int] | None:
        """The prompt token ids an engine would compute for an OpenAI request body, or None
        when this request cannot be tokenized here (other APIs, template errors, ...)."""
        got = self._request_text(api, body)
        if got is None or isinstance(got, list):
            return got
        return self.encode(got[0], got[1], marks)

    def request_partial(self, api: str, body: Mapping[str, Any]) -> PartialIds | None:
        """`request_ids`, tokenized only as far as the cache reaches (`encode_partial`)."""
        got = self._request_text(api, body)
        if got is None:
            return None
        if isinstance(got, list):
            return PartialIds(self, got, [], complete=True)
        return self.encode_partial(*got)

    def _request_text(
        self, api: str, body: Mapping[str, Any]
    ) -> tuple[str, bool] | list[int] | None:
        """(prompt text, add_special_tokens) of a request, its token ids when it gives
        them, or None when it cannot be tokenized here."""
        if api == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or self.chat is None:
                return None
            extra = body.get("chat_template_kwargs")
            try:
                text = self.chat.render(
                    messages,
                    add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                    continue_final_message=bool(body.get("continue_final_message", False)),
                    tools=body.get("tools"),
                    documents=body.get("documents"),
                    extra=extra if isinstance(extra, dict) else None,
                )
            except ChatTemplateError as e:
                log.debug("chat template refused a request: %s", e)
                return None
            return text, bool(body.get("add_special_tokens", False))
        if api == "completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
                prompt = prompt[0]  # a batch: each prompt is its own sequence; route by the first
            if isinstance(prompt, str):
                return prompt, bool(body.get("add_special_tokens", True))
            if (
                isinstance(prompt, list)
                and prompt
                and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
            ):
                return list(prompt)
        return None

    # ---- load-time checks ------------------------------------------------------------------------
    def _special_wrapping(self) -> tuple[list[int], list[int], bool]:
        """Which ids `add_special_tokens=True` puts around a text (e.g. BOS)."""
        probe = "hello world"
        plain = list(self._tok.encode(probe, add_special_tokens=False).ids)
        full = list(self._tok.encode(probe, add_special_tokens=True).ids)
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return full[:i], full[i + len(plain) :], True
        return [], [], False

    def _special_texts(self) -> list[str]:
        """The special tokens the tokenizer matches verbatim, longest first."""
        try:
            added = self._tok.get_added_tokens_decoder().values()
        except AttributeError:  # tokenizers < 0.19
            return []
        texts = {t.content for t in added if t.special and not t.normalized and t.content}
        return sorted(texts, key=len, reverse=True)

    def _probe_ok(self, probe: str) -> bool:
        whole = list(self._tok.encode(probe, add_special_tokens=False).ids)
        self._cache = _ChunkCache(self._cache.max_tokens)
        return self.encode(probe) == whole

    def _chunking_safe(self, tokenizer_json: Mapping[str, Any] | None) -> bool:
        if tokenizer_json is not None:
            if not _types_ok(tokenizer_json.get("normalizer"), _SAFE_NORMALIZERS, allow_none=True):
                return False
            if not _types_ok(tokenizer_json.get("pre_tokenizer"), _SAFE_PRETOKENIZERS):
                return False
            for t in tokenizer_json.get("added_tokens") or []:
                if " " in str(t.get("content", "")) or t.get("lstrip") or t.get("rstrip"):
                    return False
        saved = self.chunk_chars
        self.chunking = True
        self.chunk_chars = 16
        try:
            special_at, self._special_at = self._special_at, None
            for probe in _PROBES:
                if not self._probe_ok(probe):
                    log.warning("%s: chunked tokenization differs; prefix caching off", self.source)
                    return False
            self._special_at = special_at
            if special_at is not None:
                for probe in _PROBES:
                    if not self._probe_ok(probe.replace(" ", self._specials[0], 3)):
                        log.warning("%s: chunks cannot end at special tokens", self.source)
                        self._special_at = None
                        break
            return True
        finally:
            self.chunk_chars = saved
            self._cache = _ChunkCache(self._cache.max_tokens)
            self.stats = TokenizerStats()


def _types_ok(node: Any, allowed: set[str], allow_none: bool = False) -> bool:
    if node is None:
        return allow_none
    if not isinstance(node, dict):
        return False
    kind = node.get("type")
    if kind == "Sequence":
        subs = node.get("normalizers") or node.get("pretokenizers") or []
        return all(_types_ok(s, allowed) for s in subs)
    return kind in allowed


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _config_template(config: Mapping[str, Any]) -> str | None:
    tpl = config.get("chat_template")
    if isinstance(tpl, str):
        return tpl
    if isinstance(tpl, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None


def load_tokenizer(path: str | Path, **kwargs: Any) -> ModelTokenizer:
    """A tokenizer directory (`tokenizer.json` [+ `tokenizer_config.json`]) -> ModelTokenizer.

    Raises TokenizerError with a message naming the file when something is missing or broken.
    """
    d = Path(path)
    tj = d / "tokenizer.json"
    if not d.is_dir():
        raise TokenizerError(f"tokenizer directory {d} does not exist")
    if not tj.is_file():
        raise TokenizerError(f"{tj} is missing (a Hugging Face tokenizer.json is required)")
    try:
        raw = tj.read_text()
        tok_json = json.loads(raw)
        tokenizer = Tokenizer.from_str(raw)
    except (OSError, ValueError, Exception) as e:  # tokenizers raises a plain Exception
        raise TokenizerError(f"{tj} cannot be loaded: {e}") from e
    config: dict[str, Any] = {}
    cfg_path = d / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            loaded = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{cfg_path} cannot be loaded: {e}") from e
        if not isinstance(loaded, dict):
            raise TokenizerError(f"{cfg_path} must hold a JSON object")
        config = loaded
    template: str | None = None
    jinja_file = d / "chat_template.jinja"
    json_file = d / "chat_template.json"
    try:
        if jinja_file.is_file():
            template = jinja_file.read_text()
        elif json_file.is_file():
            template = _config_template(json.loads(json_file.read_text()))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"chat template in {d} cannot be loaded: {e}") from e
    try:
        return ModelTokenizer(
            tokenizer,
            config,
            source=str(d),
            chat_template=template,
            tokenizer_json=tok_json,
            **kwargs,
        )
    except ChatTemplateError as e:
        raise TokenizerError(f"{d}: {e}") from e


class TokenizerSet:
    """Tokenizers by model name, with an optional default for every other model."""

    def __init__(
        self,
        default: ModelTokenizer | None = None,
        by_model: Mapping[str, ModelTokenizer] | None = None,
    ) -> None:
        self.default = default
        self.by_model = dict(by_model or {})

    def get(self, model: str) -> ModelTokenizer | None:
        return self.by_model.get(model, self.default)

    def __bool__(self) -> bool:
        return self.default is not None or bool(self.by_model)

    @classmethod
    def from_specs(cls, specs: Sequence[str], **kwargs: Any) -> TokenizerSet:
        """`DIR` (every model) or `MODEL=DIR` entries, as given to `--tokenizer-dir`."""
        out = cls()
        for spec in specs:
            model, sep, path = spec.rpartition("=")
            if not sep:
                if out.default is not None:
                    raise TokenizerError("--tokenizer-dir: more than one default directory")
                out.default = load_tokenizer(path, **kwargs)
            else:
                if not model:
                    raise TokenizerError(f"--tokenizer-dir {spec!r}: empty model name")
                out.by_model[model] = load_tokenizer(path, **kwargs)
        return out
