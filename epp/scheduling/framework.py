"""Plugin interfaces of the scheduler and the results it produces.

A scheduling cycle runs one or more profiles, chosen by the ProfileHandler. A profile is
filters → weighted scorers → picker. Scorers return one value in [0, 1] per endpoint
(higher is better), aligned with the endpoint list they were given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.request import CycleState, InferenceRequest
from epp.scheduling.services import Services

# Per-request data the scheduler produces for request-lifecycle plugins, only when one of
# them consumes it: the prompt's prefix block hashes, and the latency predictions for the
# pick (TTFT, TPOT, the prefill work queued ahead, SLO met).
PREFIX_HASHES = "prefix-hashes"
PREDICTIONS = "predictions"
ALL_OUTPUTS = frozenset({PREFIX_HASHES, PREDICTIONS})


class Plugin:
    """Base of every plugin. `type_name` is the config `type`; `name` the instance name."""

    type_name: ClassVar[str] = ""

    def __init__(
        self,
        name: str = "",
        params: Mapping[str, Any] | None = None,
        services: Services | None = None,
    ) -> None:
        self.name = name or self.type_name
        self.params: Mapping[str, Any] = params or {}
        self.services = services or Services()
        self.configure()

    def configure(self) -> None:
        """Read `self.params`; raise ValueError with a clear message on bad values."""

    def on_picked(
        self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult
    ) -> None:
        """Called once the cycle's decision is final (e.g. to remember a session)."""


class Filter(Plugin):
    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        raise NotImplementedError


class Scorer(Plugin):
    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        raise NotImplementedError


class Picker(Plugin):
    def pick(
        self,
        cycle: CycleState,
        request: InferenceRequest,
        endpoints: Sequence[Endpoint],
        scores: Sequence[float],
    ) -> list[Endpoint]:
        """Endpoints in preference order: the first is the target, the rest fallbacks."""
        raise NotImplementedError


@dataclass(slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(slots=True)
class ProfileResult:
    profile: str
    ranked: list[Endpoint]
    scores: dict[str, float] = field(default_factory=dict)  # endpoint key -> total score
    per_plugin: dict[str, list[float]] | None = None  # only when debug logging is on


@dataclass(slots=True)
class PDDecision:
    """Why the P/D handler did or did not name a prefill endpoint (observability)."""

    disaggregated: bool
    reason: str  # e.g. remote-faster, local-faster, below-threshold, no-prefill-endpoint
    local_uncached: int = 0
    remote_uncached: int | None = None
    local_ms: float | None = None  # predicted time to first token, prefilled locally
    remote_ms: float | None = None  # ... prefilled on the prefill endpoint (hop included)

    @property
    def decision(self) -> str:
        return "disaggregated" if self.disaggregated else "local"


@dataclass(slots=True)
class SchedulingResult:
    primary: list[Endpoint]  # target first, then fallbacks
    prefill: Endpoint | None = None
    profiles: dict[str, ProfileResult] = field(default_factory=dict)
    predicted_ttft_ms: float | None = None
    predicted_tpot_ms: float | None = None
    slo_met: bool | None = None  # None = the request had no SLO
    uncached_tokens: int = 0  # estimated prompt tokens the target will have to prefill
    # Prefill tokens already queued on the prefilling endpoint at pick time (PREDICTIONS).
    queued_prefill_tokens: int = 0
    prefix_hashes: list[int] = field(default_factory=list)  # block hashes (PREFIX_HASHES)
    # Prompt tokens the target is predicted to have cached, when a plugin predicted it;
    # `prediction_mode` says from which index ("precise" or "approximate").
    predicted_cached_tokens: int | None = None
    prediction_mode: str = ""
    pd: PDDecision | None = None  # set by a P/D profile handler
    cycle: CycleState | None = None  # until the post-pick plugins were told (Scheduler)

    @property
    def target(self) -> Endpoint:
        return self.primary[0]


class ProfileRunner:
    """What a ProfileHandler calls to run a named profile on a candidate list."""

    def run(
        self,
        profile: str,
        cycle: CycleState,
        request: InferenceRequest,
        candidates: list[Endpoint],
    ) -> ProfileResult | None:
        raise NotImplementedError

    def has_profile(self, profile: str) -> bool:
        raise NotImplementedError

    def default_profile(self) -> str:
        raise NotImplementedError


class ProfileHandler(Plugin):
    """Decides which profiles run and turns their results into one SchedulingResult."""

    def schedule(
        self,
        runner: ProfileRunner,
        cycle: CycleState,
        request: InferenceRequest,
        candidates: list[Endpoint],
    ) -> SchedulingResult | None:
        raise NotImplementedError


class SchedulingError(Exception):
    """No endpoint could be chosen; carries the reason for the client."""
