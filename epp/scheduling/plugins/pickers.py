"""Pickers: max-score with random tie-break, weighted-random, random.

`maxNumOfEndpoints` (default 1) is how many endpoints are returned: the target first, then
fallbacks Envoy may try in order.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.framework import Picker
from epp.scheduling.request import CycleState, InferenceRequest


class _CountedPicker(Picker):
    def configure(self) -> None:
        self.count = max(1, int(self.params.get("maxNumOfEndpoints", 1)))
        self.rng = random.Random(self.params.get("seed"))


class MaxScorePicker(_CountedPicker):
    type_name = "max-score-picker"

    def pick(
        self,
        cycle: CycleState,
        request: InferenceRequest,
        endpoints: Sequence[Endpoint],
        scores: Sequence[float],
    ) -> list[Endpoint]:
        if not endpoints:
            return []
        total = sum(scores)
        if total != total:  # a NaN from a misbehaving scorer (sum is C-fast): treat it as 0
            scores = [0.0 if s != s else s for s in scores]
        if self.count == 1:
            best = max(scores)
            ties = [ep for ep, s in zip(endpoints, scores, strict=True) if s >= best - 1e-9]
            return [ties[0] if len(ties) == 1 else self.rng.choice(ties)]
        return [endpoints[i] for i in self._best(scores)]

    def _best(self, scores: Sequence[float]) -> list[int]:
        """Indexes of the `count` best scores, best first, random keys breaking ties: the
        head of the order by (-score, key). Only the scores at or above the count-th best
        can be in it, so only those are sorted (1,000 endpoints, 3 wanted: a handful)."""
        n = len(scores)
        rnd = self.rng.random
        ties = [rnd() for _ in range(n)]  # one key per endpoint: the same draws every pick
        count = self.count
        if count < n:
            cut = heapq.nlargest(count, scores)[-1]
            top = [i for i, s in enumerate(scores) if s >= cut]
        else:
            top = list(range(n))
        top.sort(key=lambda i: (-scores[i], ties[i]))
        return top[:count]


class WeightedRandomPicker(_CountedPicker):
    """Samples without replacement with probability proportional to score."""

    type_name = "weighted-random-picker"

    def pick(
        self,
        cycle: CycleState,
        request: InferenceRequest,
        endpoints: Sequence[Endpoint],
        scores: Sequence[float],
    ) -> list[Endpoint]:
        if not endpoints:
            return []
        rng = self.rng
        # Efraimidis–Spirakis: key = u^(1/w), compared as log(u)/w so that small weights do
        # not underflow every key to 0.0 (which made ties go to the last endpoint); zero
        # weights get a tiny floor so all stay eligible. 1 - random() is in (0, 1].
        keyed = sorted(
            ((math.log(1.0 - rng.random()) / max(s, 1e-6), i) for i, s in enumerate(scores)),
            reverse=True,
        )
        return [endpoints[i] for _, i in keyed[: self.count]]


class RandomPicker(_CountedPicker):
    type_name = "random-picker"

    def pick(
        self,
        cycle: CycleState,
        request: InferenceRequest,
        endpoints: Sequence[Endpoint],
        scores: Sequence[float],
    ) -> list[Endpoint]:
        return self.rng.sample(list(endpoints), min(self.count, len(endpoints)))
