"""Helpers shared by plugins: the per-cycle prefix match, the prompt's token ids, the
predicted cached tokens per endpoint, and score normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.precise_index import PreciseIndex
from epp.scheduling.prefix_index import PrefixMatch
from epp.scheduling.request import CycleState, InferenceRequest
from epp.scheduling.services import Services
from epp.tokenization.tokenizer import PartialIds

PREFIX_KEY = "prefix-match"
TOKENS_KEY = "prompt-tokens"
CACHED_KEY = "cached-tokens"
PRECISE_MATCH_KEY = "precise-match"  # endpoint key -> leading blocks held (precise index)


def prefix_match(cycle: CycleState, services: Services, request: InferenceRequest) -> PrefixMatch:
    """Hash the prompt and match it against the approximate index once per cycle."""
    cached: PrefixMatch | None = cycle.get(PREFIX_KEY)
    if cached is None:
        index = services.prefix_index
        hashes = index.hash_request(request)
        cached = PrefixMatch(hashes, index.match(hashes))
        cycle.set(PREFIX_KEY, cached)
    return cached


@dataclass(slots=True)
class PromptTokens:
    """The prompt as the engine will see it: token count, the precise block hashes of its
    head and the leading blocks each pod holds (`PreciseIndex.match`). The head is the
    whole prompt when `exact`; otherwise it reaches past every block any pod holds, the
    tail was not tokenized (it cannot change any match) and `count` is estimated."""

    count: int
    hashes: list[int]
    held: dict[str, int]
    exact: bool = True
    partial: PartialIds | None = None

    def complete(self, precise: PreciseIndex) -> list[int]:
        """Tokenize the rest (after the pick: for the speculative entries) and return the
        hashes of every block; `count` becomes exact."""
        part = self.partial
        if self.exact or part is None:
            return self.hashes
        self.hashes = _encode_more(precise, part, self.hashes, None)
        self.count = len(part.ids)
        self.exact = True
        self.partial = None
        return self.hashes


def prompt_tokens(
    cycle: CycleState, services: Services, request: InferenceRequest
) -> PromptTokens | None:
    """Tokenize the prompt once per cycle (precise prefix routing only), as far as the
    engines' caches can match it; None when there is no tokenizer for the model or the
    request cannot be tokenized here. Sets the request's `prompt_tokens`."""
    got: PromptTokens | bool | None = cycle.get(TOKENS_KEY)
    if got is not None:
        return got if isinstance(got, PromptTokens) else None
    precise, tokenizers = services.precise, services.tokenizers
    tok = tokenizers.get(request.routed_model) if tokenizers is not None else None
    partial = None
    if precise is not None and tok is not None and request.body is not None:
        partial = tok.request_partial(request.api, request.body)
    if partial is None or precise is None or (partial.complete and not partial.ids):
        cycle.set(TOKENS_KEY, False)
        return None
    hashes = precise.hash_prompt(partial.ids, partial.marks)
    held = precise.match(hashes)
    step = 1
    # While some pod holds every block known so far, the next ones may be there too:
    # encode more of the prompt, twice as much each time (a long cached history costs a
    # few rounds, a fresh tail after a shared head one chunk).
    while not partial.complete and (not hashes or max(held.values(), default=0) >= len(hashes)):
        past = _peek_past_every_pod(precise, partial, hashes) if hashes else None
        if past is not None:
            held = past
            break
        hashes = _encode_more(precise, partial, hashes, step)
        step *= 2
        held = precise.match(hashes)
    out = PromptTokens(
        len(partial.ids) + partial.rest_estimate(),
        hashes,
        held,
        exact=partial.complete,
        partial=None if partial.complete else partial,
    )
    request.prompt_tokens = out.count
    cycle.set(TOKENS_KEY, out)
    return out


def _peek_past_every_pod(
    precise: PreciseIndex, part: PartialIds, hashes: list[int]
) -> dict[str, int] | None:
    """Hash the blocks after `hashes` (the full blocks of `part.ids`) from a few words
    past the known ids (`PartialIds.peek`), one block more at a time while some pod holds
    them all. When none does, the pods' matches (`hashes` extended over those blocks):
    the rest of the prompt cannot change them (mostly a fresh question after a shared
    system prompt, told for the price of a few words instead of a chunk). None, with
    `hashes` as it was, when the peek cannot tell."""
    bs = precise.block_size
    n = len(part.ids)
    known = len(hashes)
    while True:
        start = len(hashes) * bs
        extra = part.peek(start + bs - n)
        if extra is None:
            del hashes[known:]
            return None
        tail = part.ids[start:] + extra if start < n else extra[start - n :]
        h = hashes[-1]
        for i in range(0, len(tail) - bs + 1, bs):
            h = precise.hash_next(h, tail[i : i + bs])
            hashes.append(h)
        held = precise.match(hashes)
        if max(held.values(), default=0) < len(hashes):
            return held


def _encode_more(
    precise: PreciseIndex, part: PartialIds, hashes: list[int], chunks: int | None
) -> list[int]:
    """Encode `chunks` more of the prompt (None: all of it) and extend `hashes`, the block
    hashes of `part.ids` so far, over what that added."""
    done = len(part.marks)
    del hashes[part.marks[-1][1] // precise.block_size if done else 0 :]  # up to a chunk end
    if chunks is None:
        part.finish()
    else:
        part.more(chunks)
    return precise.hash_prompt(part.ids, part.marks, resume=hashes, first_mark=done)


def cached_tokens(
    cycle: CycleState, services: Services, request: InferenceRequest
) -> dict[str, int]:
    """Predicted prompt tokens each endpoint has cached (absent = 0): exact from the
    engines' KV events where the precise index is trusted, else the approximate guess."""
    got: dict[str, int] | None = cycle.get(CACHED_KEY)
    if got is not None:
        return got
    match = prefix_match(cycle, services, request)
    bt = services.prefix_index.block_tokens
    out = {k: b * bt for k, b in match.matched_blocks.items()}
    precise = services.precise
    if precise is not None:
        pt = prompt_tokens(cycle, services, request)
        if pt is not None:
            pods = precise.pods
            for k in [k for k in out if k in pods and pods[k].trusted]:
                del out[k]
            bs = precise.block_size
            limit = (pt.count - 1) // bs  # the engine always computes the last prompt token
            held = pt.held
            cycle.set(PRECISE_MATCH_KEY, held)
            for k, n in held.items():
                if pods[k].trusted:
                    out[k] = min(n, limit) * bs
    cycle.set(CACHED_KEY, out)
    return out


def uncached_tokens(
    cycle: CycleState, services: Services, request: InferenceRequest, ep: Endpoint
) -> int:
    cached = cached_tokens(cycle, services, request).get(ep.key, 0)
    return max(0, request.prompt_tokens - cached)


def inverse_minmax(values: Sequence[float]) -> list[float]:
    """Lowest value → 1.0, highest → 0.0; all equal → 1.0 each."""
    lo = min(values)
    hi = max(values)
    if hi <= lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]


def inverse_relative(values: Sequence[float], floor: float) -> list[float]:
    """1 - value / max(largest value, floor): an idle pool (all values below `floor`) yields
    gentle differences, so one request more does not swing a score from 1 to 0."""
    hi = max(max(values), floor)
    return [1.0 - v / hi for v in values]
