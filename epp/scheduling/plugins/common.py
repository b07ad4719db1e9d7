"""Helpers shared by plugins: the per-cycle prefix match and score normalisation."""

from __future__ import annotations

from collections.abc import Sequence

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.prefix_index import PrefixMatch
from epp.scheduling.request import CycleState, InferenceRequest
from epp.scheduling.services import Services

PREFIX_KEY = "prefix-match"


def prefix_match(cycle: CycleState, services: Services, request: InferenceRequest) -> PrefixMatch:
    """Hash the prompt and match it against the index once per cycle."""
    cached: PrefixMatch | None = cycle.get(PREFIX_KEY)
    if cached is None:
        index = services.prefix_index
        hashes = index.hash_prompt(request.routed_model, request.prompt)
        cached = PrefixMatch(hashes, index.match(hashes))
        cycle.set(PREFIX_KEY, cached)
    return cached


def uncached_tokens(
    cycle: CycleState, services: Services, request: InferenceRequest, ep: Endpoint
) -> int:
    match = prefix_match(cycle, services, request)
    cached = match.matched_tokens(ep.key, services.prefix_index.block_tokens)
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
