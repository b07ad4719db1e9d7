"""The per-request lifecycle between the protocol layer and the scheduler.

`admit` turns a parsed request into a `Decision` (model resolution and rewrite, candidate
endpoints, admission, scheduling) and charges the chosen endpoints *at pick time* so a
burst never sees stale load. `first_byte`, `prefill_elapsed`, `complete` and `release`
feed the latency model
and give back what was charged; `release` is idempotent and is always called (stream end,
error or reset), so in-flight counters cannot leak.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from epp.datalayer.datastore import Criticality, Datastore, ModelInfo
from epp.datalayer.endpoint import Endpoint
from epp.requestcontrol.admission import SaturationPolicy
from epp.requestcontrol.errors import model_not_found, shed, unavailable
from epp.scheduling.framework import SchedulingError, SchedulingResult
from epp.scheduling.request import InferenceRequest
from epp.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)

_CRITICALITY_PRIORITY = {
    Criticality.CRITICAL: 1,
    Criticality.STANDARD: 0,
    Criticality.SHEDDABLE: -1,
}


@dataclass(slots=True)
class HeaderNames:
    business: str = "x-business"
    objective: str = "x-gateway-inference-objective"
    fairness: str = "x-gateway-inference-fairness-id"
    model_rewrite: str = "x-gateway-model-name-rewrite"
    slo_ttft: str = "x-slo-ttft-ms"
    slo_tpot: str = "x-slo-tpot-ms"
    session: str = "x-session-id"
    destination: str = "x-gateway-destination-endpoint"
    prefiller: str = "x-prefiller-host-port"

    def control_headers(self) -> tuple[str, ...]:
        """Headers meant for the EPP only; never forwarded to a model server."""
        return (
            self.business,
            self.objective,
            self.fairness,
            self.model_rewrite,
            self.slo_ttft,
            self.slo_tpot,
            self.session,
        )


@dataclass(slots=True)
class DirectorSettings:
    headers: HeaderNames = field(default_factory=HeaderNames)
    saturation: SaturationPolicy = field(default_factory=SaturationPolicy)
    # With InferenceModels defined, a model none of them names is 404 unless passthrough.
    model_passthrough: bool = True


@dataclass(slots=True)
class Admitted:
    request: InferenceRequest
    candidates: list[Endpoint]
    rewritten_model: str | None


@dataclass(slots=True)
class Decision:
    request: InferenceRequest
    result: SchedulingResult
    rewritten_model: str | None  # set when the body's model must be replaced
    started: float  # monotonic, at pick time
    queued_ahead: int = 0  # prefill tokens queued on the prefilling endpoint at pick time
    first_byte_at: float = 0.0
    prefill_settled: bool = False
    released: bool = False
    status: int = 0
    served: str = ""  # endpoint Envoy reports it actually used

    @property
    def target(self) -> Endpoint:
        return self.result.target

    @property
    def charged_tokens(self) -> int:
        """Tokens charged to the target's in-flight load (prompt + expected decode)."""
        return self.request.prompt_tokens + self.request.expected_decode_tokens


class Director:
    def __init__(
        self,
        datastore: Datastore,
        scheduler: Scheduler,
        settings: DirectorSettings | None = None,
        *,
        rng: random.Random | None = None,
        on_pick: Callable[[Decision], None] | None = None,
    ) -> None:
        self.datastore = datastore
        self.scheduler = scheduler
        self.settings = settings or DirectorSettings()
        self.rng = rng or random.Random()
        self.on_pick = on_pick
        self.prefix_index = scheduler.services.prefix_index
        self.latency = scheduler.services.latency
        datastore.on_endpoint_removed(lambda ep: self.prefix_index.remove_endpoint(ep.key))

    # ---- admission + scheduling ---------------------------------------------------------------
    def apply_headers(self, req: InferenceRequest, headers: dict[str, str]) -> None:
        h = self.settings.headers
        req.business = headers.get(h.business) or None
        if (session := headers.get(h.session)) is not None and session:
            req.session_key = session
        req.slo_ttft_ms = _float_header(headers, h.slo_ttft)
        req.slo_tpot_ms = _float_header(headers, h.slo_tpot)
        if rewrite := headers.get(h.model_rewrite):
            req.target_model = rewrite
        objective_name = headers.get(h.objective)
        if objective_name:
            objective = self.datastore.objective(objective_name)
            if objective is not None:
                req.priority = objective.priority
                req.objective = objective.name

    def _resolve_model(self, req: InferenceRequest) -> str | None:
        """Apply the InferenceModel for `req.model`; returns the rewritten name if any."""
        info: ModelInfo | None = self.datastore.model(req.model)
        if info is None:
            if self.datastore.has_model_definitions and not self.settings.model_passthrough:
                raise model_not_found(req.model)
            return req.target_model or None
        if not req.priority and req.objective is None:  # an objective wins, even at 0
            req.priority = _CRITICALITY_PRIORITY[info.criticality]
        if req.target_model or not info.target_models:
            return req.target_model or None
        targets = info.target_models
        total = sum(max(0, t.weight) for t in targets)
        if total <= 0:
            return None
        r = self.rng.uniform(0, total)
        for t in targets:
            r -= max(0, t.weight)
            if r <= 0:
                break
        if t.name != req.model:
            req.target_model = t.name
            return t.name
        return None

    def admit(self, req: InferenceRequest) -> Decision:
        return self.schedule(self.admission(req))

    def admission(self, req: InferenceRequest) -> Admitted:
        """Model resolution, candidates and load shedding: everything before scheduling."""
        rewritten = self._resolve_model(req)
        model = req.routed_model
        serving = self.datastore.endpoints_for_model(model)
        if not serving:
            raise model_not_found(model)
        candidates = [ep for ep in serving if ep.ready]
        if req.subset is not None:
            candidates = [ep for ep in candidates if ep.key in req.subset]
            if not candidates:
                raise unavailable("no ready endpoint in the proxy's subset hint")
        if not candidates:
            raise unavailable(f"no ready endpoint serves model '{model}'")
        if req.priority < 0 and self.settings.saturation.pool_saturated(candidates):
            raise shed("the pool is saturated and the request is sheddable")
        return Admitted(req, candidates, rewritten)

    def schedule(self, admitted: Admitted) -> Decision:
        req = admitted.request
        try:
            result = self.scheduler.schedule(req, admitted.candidates)
        except SchedulingError as e:
            raise unavailable(str(e)) from e
        decision = Decision(req, result, admitted.rewritten_model, time.monotonic())
        self._charge(decision)
        if self.on_pick is not None:
            self.on_pick(decision)
        return decision

    def pick_any(self, request_id: str) -> Endpoint:
        """For header-only requests (no model): the least loaded ready endpoint."""
        ready = [ep for ep in self.datastore.endpoints() if ep.ready and ep.can_decode()]
        if not ready:
            raise unavailable("no ready endpoint")
        return min(ready, key=lambda ep: (ep.inflight.requests, self.rng.random()))

    # ---- accounting --------------------------------------------------------------------------
    def _charge(self, d: Decision) -> None:
        res = d.result
        target = res.target
        prefilling = res.prefill or target
        inf = target.inflight
        d.queued_ahead = self.latency.queued_prefill_tokens(prefilling)
        inf.requests += 1
        inf.tokens += d.charged_tokens
        inf.pending_requests += 1
        hashes = res.prefix_hashes
        if res.prefill is not None:
            pf = res.prefill.inflight
            pf.prefill_requests += 1
            pf.prefill_tokens += res.uncached_tokens
            self.prefix_index.insert(res.prefill, hashes)
        else:
            inf.pending_prefill_tokens += res.uncached_tokens
        self.latency.observe_sent(prefilling, res.uncached_tokens)
        # The decode endpoint ends up holding the whole prompt's KV either way.
        self.prefix_index.insert(target, hashes)

    def _settle_prefill(self, d: Decision) -> None:
        """The first token came (or the request ended): the prefill work is done."""
        if d.prefill_settled:
            return
        d.prefill_settled = True
        res = d.result
        if res.prefill is not None:
            pf = res.prefill.inflight
            pf.prefill_requests -= 1
            pf.prefill_tokens -= res.uncached_tokens
        else:
            res.target.inflight.pending_prefill_tokens -= res.uncached_tokens
        res.target.inflight.pending_requests -= 1

    def first_byte(self, d: Decision, now: float | None = None, *, learn: bool = True) -> None:
        """The first token is back: the prefill work is done. With `learn`, the time is a
        true TTFT and trains the latency model (a stream's first body chunk; not response
        headers, which engines send before the first token)."""
        if d.first_byte_at or d.released:
            return
        d.first_byte_at = now if now is not None else time.monotonic()
        if learn:
            ep = d.result.prefill or d.target
            ttft_ms = (d.first_byte_at - d.started) * 1000.0
            self.latency.observe_ttft(ep, ttft_ms, d.result.uncached_tokens + d.queued_ahead)
        self._settle_prefill(d)

    def prefill_elapsed(self, d: Decision) -> None:
        """No first-token signal, but the predicted TTFT has passed: stop counting this
        request's prefill as queued work."""
        if d.first_byte_at or d.released or d.prefill_settled:
            return
        self._settle_prefill(d)

    def complete(self, d: Decision, output_tokens: int, now: float | None = None) -> None:
        """End of a successful response with `output_tokens` generated (from usage)."""
        if d.released or not d.first_byte_at or output_tokens < 2:
            return
        end = now if now is not None else time.monotonic()
        tpot_ms = (end - d.first_byte_at) * 1000.0 / (output_tokens - 1)
        self.latency.observe_tpot(d.target, tpot_ms, self.latency.batch_size(d.target))

    def release(self, d: Decision | None) -> None:
        if d is None or d.released:
            return
        self._settle_prefill(d)
        d.released = True
        inf = d.target.inflight
        inf.requests -= 1
        inf.tokens -= d.charged_tokens


def _float_header(headers: dict[str, str], name: str) -> float | None:
    v = headers.get(name)
    if not v:
        return None
    try:
        f = float(v)
    except ValueError:
        return None
    return f if 0 < f < math.inf else None  # inf would make SLO scores NaN
