"""Runs scheduling profiles (filters → weighted scorers → picker) under a ProfileHandler."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter

from epp import clock
from epp.datalayer.endpoint import Endpoint
from epp.scheduling.framework import (
    ALL_OUTPUTS,
    PREDICTIONS,
    PREFIX_HASHES,
    Filter,
    Picker,
    Plugin,
    ProfileHandler,
    ProfileResult,
    ProfileRunner,
    SchedulingError,
    SchedulingResult,
    WeightedScorer,
)
from epp.scheduling.plugins.common import (
    CACHED_KEY,
    PRECISE_MATCH_KEY,
    TOKENS_KEY,
    PromptTokens,
    prefix_match,
    prompt_tokens,
)
from epp.scheduling.request import CycleState, InferenceRequest
from epp.scheduling.services import Services

# (plugin kind, plugin name, seconds) — observability hooks in here without an import.
PluginTimer = Callable[[str, str, float], None]


@dataclass(slots=True)
class Profile:
    name: str
    filters: list[Filter] = field(default_factory=list)
    scorers: list[WeightedScorer] = field(default_factory=list)
    picker: Picker | None = None


class Scheduler(ProfileRunner):
    def __init__(
        self,
        profiles: dict[str, Profile],
        handler: ProfileHandler,
        plugins: list[Plugin],
        services: Services,
        *,
        timer: PluginTimer | None = None,
        debug: bool = False,
    ) -> None:
        if not profiles:
            raise ValueError("a scheduler needs at least one profile")
        self.profiles = profiles
        self.handler = handler
        self.services = services
        self.timer = timer
        self.debug = debug
        self._first = next(iter(profiles))
        # What `schedule` computes beyond the pick; the director narrows it to what its
        # lifecycle hooks consume.
        self.outputs: frozenset[str] = ALL_OUTPUTS
        self._post_pick = [p for p in plugins if type(p).on_picked is not Plugin.on_picked]

    # ---- ProfileRunner ---------------------------------------------------------------------
    def has_profile(self, profile: str) -> bool:
        return profile in self.profiles

    def default_profile(self) -> str:
        return self._first

    def run(
        self,
        profile: str,
        cycle: CycleState,
        request: InferenceRequest,
        candidates: list[Endpoint],
    ) -> ProfileResult | None:
        prof = self.profiles.get(profile)
        if prof is None:
            return None
        timer = self.timer
        eps = candidates
        for f in prof.filters:
            t0 = perf_counter()
            eps = f.filter(cycle, request, eps)
            if timer:
                timer("filter", f.name, perf_counter() - t0)
            if not eps:
                return None
        n = len(eps)
        totals = [0.0] * n
        per_plugin: dict[str, list[float]] | None = {} if self.debug else None
        for ws in prof.scorers:
            t0 = perf_counter()
            scores = ws.scorer.score(cycle, request, eps)
            if timer:
                timer("scorer", ws.scorer.name, perf_counter() - t0)
            if per_plugin is not None:
                per_plugin[ws.scorer.name] = scores
            w = ws.weight
            if not w and len(scores) == n and math.isfinite(sum(scores)):
                continue  # weight 0 (a scorer run for what it sets up): adds 0.0 to each total
            totals = [t + w * s for t, s in zip(totals, scores, strict=True)]
        picker = prof.picker
        assert picker is not None  # the loader guarantees one picker per profile
        t0 = perf_counter()
        ranked = picker.pick(cycle, request, eps, totals)
        if timer:
            timer("picker", picker.name, perf_counter() - t0)
        return ProfileResult(
            profile=profile,
            ranked=ranked,
            scores={ep.key: s for ep, s in zip(eps, totals, strict=True)} if self.debug else {},
            per_plugin=per_plugin,
        )

    # ---- entry point -------------------------------------------------------------------------
    def schedule(
        self, request: InferenceRequest, candidates: list[Endpoint], *, commit: bool = True
    ) -> SchedulingResult:
        """Pick endpoints for `request`. With `commit=False` the post-pick plugins are not
        told (a plan the caller may drop); `picked` tells them once it is kept."""
        if not candidates:
            raise SchedulingError("no candidate endpoints")
        cycle = CycleState()
        services = self.services
        if services.precise is not None:
            # Tokenize before any plugin reads the prompt's size: the count becomes exact.
            t0 = perf_counter()
            prompt_tokens(cycle, services, request)
            if self.timer:
                self.timer("producer", "tokenizer", perf_counter() - t0)
        result = self.handler.schedule(self, cycle, request, candidates)
        if result is None or not result.primary:
            raise SchedulingError("no endpoint passed the filters")
        cached: dict[str, int] | None = cycle.get(CACHED_KEY)
        if cached is not None:
            key = result.target.key
            precise = services.precise
            pt = cycle.get(TOKENS_KEY)
            if precise is not None and isinstance(pt, PromptTokens) and precise.is_trusted(key):
                # What the engine holds now by its events (without the blocks just sent to
                # it, which a request running alongside may not find computed yet).
                bs = precise.block_size
                matched = (cycle.get(PRECISE_MATCH_KEY) or {}).get(key, 0)
                view = precise.pods.get(key)
                if view is not None and view.spec:  # some of it may be speculative
                    matched = precise.confirmed_prefix(key, pt.hashes[:matched])
                held = min(matched, (pt.count - 1) // bs)
                result.predicted_cached_tokens = held * bs
                result.prediction_mode = "precise"
            else:
                result.predicted_cached_tokens = cached.get(key, 0)
                result.prediction_mode = "approximate"
        outputs = self.outputs
        if PREFIX_HASHES in outputs:
            result.prefix_hashes = prefix_match(cycle, self.services, request).hashes
        if PREDICTIONS in outputs:
            self._record_prediction(request, result)
        result.cycle = cycle
        if commit:
            self.picked(request, result)
        return result

    def picked(self, request: InferenceRequest, result: SchedulingResult) -> None:
        cycle = result.cycle
        if cycle is None:
            return
        result.cycle = None
        for plugin in self._post_pick:
            plugin.on_picked(cycle, request, result)

    def _record_prediction(self, request: InferenceRequest, result: SchedulingResult) -> None:
        model = self.services.latency
        pick = result.prefill or result.target
        now = clock.now()
        queue = model.queue(pick, now, request.expected_decode_tokens)
        result.queued_prefill_tokens = int(queue.backlog_tokens)
        result.predicted_ttft_ms = model.predict_ttft_ms(pick, result.uncached_tokens, queue, now)
        result.predicted_tpot_ms = model.predict_tpot_ms(result.target, now=now)
        if request.slo_ttft_ms is None and request.slo_tpot_ms is None:
            return
        met = True
        if request.slo_ttft_ms is not None:
            met = result.predicted_ttft_ms <= request.slo_ttft_ms
        if request.slo_tpot_ms is not None:
            met = met and result.predicted_tpot_ms <= request.slo_tpot_ms
        result.slo_met = met
