"""The per-request lifecycle between the protocol layer and the scheduler.

`admit` turns a parsed request into a `Decision` (model resolution and rewrite, candidate
endpoints, admission, scheduling). The director only sequences: what happens around the
pick (accounting, prefix-index upkeep, latency learning, ...) is done by the configured
lifecycle hooks (`epp.requestcontrol.lifecycle`). The director guarantees each hook's
exactly-once calls: `prefill_done` and `release` once per scheduled request, whatever
path the request takes, so in-flight counters cannot leak.

With flow control configured, `submit` may answer with a queued `Ticket` instead of a
decision: the request is scheduled later, when capacity frees (see `flowcontrol/`).
`reconfigure` swaps the scheduler, hooks and flow control at run time; requests in flight
keep the hooks they started with.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from epp import clock
from epp.api.headers import HeaderNames
from epp.datalayer.datastore import Criticality, Datastore, ModelInfo
from epp.datalayer.endpoint import Endpoint
from epp.requestcontrol.admission import SaturationPolicy
from epp.requestcontrol.decision import Admitted, Decision
from epp.requestcontrol.errors import model_not_found, shed, unavailable
from epp.requestcontrol.flowcontrol.config import FlowControlSettings
from epp.requestcontrol.flowcontrol.controller import FlowController, FlowObserver
from epp.requestcontrol.flowcontrol.hook import FlowDispatchHook
from epp.requestcontrol.flowcontrol.queue import Ticket
from epp.requestcontrol.lifecycle import HookSet, LifecycleHook
from epp.requestcontrol.parse import check_context_length
from epp.scheduling.framework import SchedulingError, SchedulingResult
from epp.scheduling.request import InferenceRequest
from epp.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)

__all__ = ["Admitted", "Decision", "Director", "DirectorSettings", "HeaderNames", "Ticket"]

# Work estimates, in prefill-token equivalents: a request's fixed cost (API, scheduling:
# ~20 ms of a ~4k tokens/s prefill) and one output token (a decode step is shared by the
# batch).
WORK_PER_REQUEST = 80.0
WORK_PER_OUTPUT_TOKEN = 0.5
# A request whose end the EPP cannot see is charged for at most this many output tokens.
MAX_DEFERRED_DECODE_TOKENS = 2048

_CRITICALITY_PRIORITY = {
    Criticality.CRITICAL: 1,
    Criticality.STANDARD: 0,
    Criticality.SHEDDABLE: -1,
}


@dataclass(slots=True)
class DirectorSettings:
    headers: HeaderNames = field(default_factory=HeaderNames)
    saturation: SaturationPolicy = field(default_factory=SaturationPolicy)
    # With InferenceModels defined, a model none of them names is 404 unless passthrough.
    model_passthrough: bool = True


class Director:
    def __init__(
        self,
        datastore: Datastore,
        scheduler: Scheduler,
        settings: DirectorSettings | None = None,
        *,
        hooks: Sequence[LifecycleHook] | None = None,
        rng: random.Random | None = None,
        on_pick: Callable[[Decision], None] | None = None,
        flow_control: FlowControlSettings | None = None,
        flow_observer: FlowObserver | None = None,
    ) -> None:
        self.datastore = datastore
        self.settings = settings or DirectorSettings()
        self.rng = rng or random.Random()
        self.on_pick = on_pick
        self.flow_observer = flow_observer
        self.prefix_index = scheduler.services.prefix_index
        self.open_requests = 0  # scheduled, not yet released (a leak shows here)
        # Charges kept after the gateway closed their stream, per endpoint key, oldest first.
        self._deferred: dict[str, deque[Decision]] = {}
        if hooks is None:
            from epp.requestcontrol.config import default_hooks

            hooks = default_hooks(scheduler.services)
        self.flow: FlowController | None = None
        self._dispatch_hook = FlowDispatchHook(self._capacity_freed)
        self.reconfigure(scheduler, hooks, flow_control)
        datastore.on_endpoint_removed(self._forget_endpoint)

    def _forget_endpoint(self, ep: Endpoint) -> None:
        self.prefix_index.remove_endpoint(ep.key)
        precise = self.scheduler.services.precise
        if precise is not None:
            precise.remove_pod(ep.key)

    def reconfigure(
        self,
        scheduler: Scheduler,
        hooks: Sequence[LifecycleHook],
        flow_control: FlowControlSettings | None = None,
    ) -> None:
        """Swap in a new scheduler, hooks and flow control (at start and on config reload).
        Queued requests move to the new queue; requests in flight keep their hooks."""
        flow: FlowController | None = None
        if flow_control is not None:
            flow = FlowController(
                flow_control,
                self,
                observer=self.flow_observer,
                fairness_header=self.settings.headers.fairness,
            )
        # Every hook set moves the queue, so a request started before flow control was
        # turned on by a reload still frees capacity for the requests queued since.
        hook_set = HookSet(list(hooks), [self._dispatch_hook])
        scheduler.outputs = hook_set.consumes()
        old_flow = self.flow
        self.scheduler = scheduler
        self._hooks = hook_set
        self.flow = flow
        if old_flow is not None:
            if flow is not None:
                flow.adopt(old_flow)
            else:  # flow control turned off: what waited goes now
                old_flow.dispatch_all()

    @property
    def hooks(self) -> list[LifecycleHook]:
        return self._hooks.hooks

    def _capacity_freed(self) -> None:
        if self.flow is not None and self.flow.queued:
            self.flow.pump()

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
        """Admission and scheduling at once, never queued (flow control is not consulted)."""
        return self.schedule(self.admission(req))

    def submit(self, req: InferenceRequest) -> Decision | Ticket:
        """Admission, then a decision now or, with flow control, possibly a queued ticket;
        raises RequestError (404 / 429 / 503 ...)."""
        return self.dispatch(self.admission(req))

    def dispatch(self, admitted: Admitted) -> Decision | Ticket:
        """Schedule now, or (flow control, saturated pool) queue until capacity frees."""
        if self.flow is None:
            return self.schedule(admitted)
        return self.flow.submit(admitted)

    def admission(self, req: InferenceRequest) -> Admitted:
        """Model resolution, candidates and load shedding: everything before scheduling."""
        rewritten = self._resolve_model(req)
        candidates = self._candidates(req)
        if self._deferred:
            for ep in candidates:
                self.reconcile(ep)
        check_context_length(req, candidates)
        if req.priority < 0 and self.settings.saturation.pool_saturated(candidates):
            raise shed("the pool is saturated and the request is sheddable")
        return Admitted(req, candidates, rewritten)

    def _candidates(self, req: InferenceRequest) -> list[Endpoint]:
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
        return candidates

    def schedule(self, admitted: Admitted) -> Decision:
        try:
            return self.schedule_on(admitted, admitted.candidates)
        except SchedulingError as e:
            raise unavailable(str(e)) from e

    # ---- flow control's binder ------------------------------------------------------------
    def candidates(self, admitted: Admitted) -> list[Endpoint]:
        """The candidates at dispatch time (late binding: the pool may have changed)."""
        admitted.candidates = self._candidates(admitted.request)
        return admitted.candidates

    def endpoints(self) -> Sequence[Endpoint]:
        return self.datastore.endpoints()

    def speed_estimates(self) -> list[tuple[str, float, float, bool]]:
        """The latency model's speeds of every endpoint now (the operators' gauges):
        (endpoint, decode ms per token, prefill tokens/s, measured)."""
        model = self.scheduler.services.latency
        now = clock.now()
        return [(ep.key, *model.estimate(ep, now)) for ep in self.datastore.endpoints()]

    def work_estimate(self, admitted: Admitted) -> float:
        """Prefill-token equivalents: the prompt tokens no candidate has cached (as the
        approximate prefix index sees it), a per-request overhead and the decode."""
        req = admitted.request
        index = self.scheduler.services.prefix_index
        matched = index.match(index.hash_request(req))
        best = max(matched.values(), default=0) * index.block_tokens
        uncached = max(0, req.prompt_tokens - best)
        return WORK_PER_REQUEST + uncached + WORK_PER_OUTPUT_TOKEN * req.expected_decode_tokens

    def prefill_capacity(self, endpoints: Sequence[Endpoint]) -> float:
        """Prefill tokens per second the ready ones of `endpoints` can take together (the
        latency model's per-endpoint prefill speed)."""
        model = self.scheduler.services.latency
        now = clock.now()
        return sum(model.prefill_tokens_per_s(ep, now) for ep in endpoints if ep.ready)

    def schedule_on(self, admitted: Admitted, endpoints: list[Endpoint]) -> Decision:
        """Schedule on `endpoints` and run the pre-request hooks; raises SchedulingError."""
        return self.commit(admitted, self.plan(admitted, endpoints))

    def plan(self, admitted: Admitted, endpoints: list[Endpoint]) -> SchedulingResult:
        """The pick for `admitted` on `endpoints`, nothing charged yet (flow control looks
        at it before deciding the request goes now); raises SchedulingError."""
        return self.scheduler.schedule(admitted.request, endpoints, commit=False)

    def commit(self, admitted: Admitted, result: SchedulingResult) -> Decision:
        """The request goes to `result`: the pre-request hooks charge it."""
        req = admitted.request
        self.scheduler.picked(req, result)
        decision = Decision(req, result, admitted.rewritten_model, clock.now())
        self.open_requests += 1
        hook_set = self._hooks
        decision.hook_set = hook_set
        for hook in hook_set.pre_request:
            hook.pre_request(decision)
        if self.on_pick is not None:
            self.on_pick(decision)
        return decision

    def pick_any(self, request_id: str) -> Endpoint:
        """For header-only requests (no model): the least loaded ready endpoint."""
        ready = [ep for ep in self.datastore.endpoints() if ep.ready and ep.can_decode()]
        now = clock.now()
        ready = [ep for ep in ready if not ep.health.down(now)] or ready
        if not ready:
            raise unavailable("no ready endpoint")
        return min(ready, key=lambda ep: (ep.inflight.requests, self.rng.random()))

    # ---- lifecycle -------------------------------------------------------------------------
    def _set(self, d: Decision) -> HookSet:
        hook_set: HookSet | None = d.hook_set
        return hook_set if hook_set is not None else self._hooks

    def response_headers(self, d: Decision, status: int) -> None:
        if d.released:
            return
        for hook in self._set(d).response_headers:
            hook.response_headers(d, status)

    def first_byte(self, d: Decision, now: float | None = None, *, learn: bool = True) -> None:
        """The first token is back: the prefill work is done. With `learn`, the time is a
        true TTFT (a stream's first body chunk; not response headers, which engines send
        before the first token, nor the end of a non-streamed answer)."""
        if d.first_byte_at or d.released:
            return
        d.first_byte_at = now if now is not None else clock.now()
        for hook in self._set(d).first_token:
            hook.first_token(d, d.first_byte_at, learn)
        self._settle_prefill(d)

    def prefill_elapsed(self, d: Decision) -> None:
        """No first-token signal, but the predicted TTFT has passed: stop counting this
        request's prefill as queued work."""
        if d.first_byte_at or d.released:
            return
        self._settle_prefill(d)

    def complete(self, d: Decision, output_tokens: int, now: float | None = None) -> None:
        """End of a successful response with `output_tokens` generated (from usage)."""
        if d.released:
            return
        end = now if now is not None else clock.now()
        for hook in self._set(d).complete:
            hook.complete(d, output_tokens, end)

    def release_delay_s(self, d: Decision, response_started: bool) -> float:
        """The gateway closed the request's stream. If it closed after the response headers
        but before the response ended (it sends the EPP nothing later: the usual headers-only
        response processing), the request is still decoding: keep its load charged until
        it probably ends (predicted TTFT + expected decode time from the pick) rather than
        count the pod as idle while it works; only for streamed answers from endpoints whose
        engine reports its request counts, which can end the charge sooner (see
        `reconcile`). 0 = release now. The caller releases after
        the delay; `stream_closed` registers the charge so that the engine's own counts
        can end it sooner (see `reconcile`)."""
        if d.released or not response_started or not d.request.stream:
            return 0.0  # a non-streamed answer's headers come with its end
        if d.result.target.metrics.updated_at == 0.0:
            return 0.0  # no engine counts to correct a guess with: do not guess
        now = clock.now()
        return self._predicted_end(d, now) - now

    def _predicted_end(self, d: Decision, now: float) -> float:
        res = d.result
        ttft_s = (res.predicted_ttft_ms or 0.0) / 1000.0
        model = self.scheduler.services.latency
        decode_s = model.decode_time_s(
            res.target, min(d.request.expected_decode_tokens, MAX_DEFERRED_DECODE_TOKENS), now
        )
        return max(d.first_byte_at or (d.started + ttft_s), now) + decode_s

    def stream_closed(self, d: Decision, response_started: bool) -> float:
        """The gateway's stream for `d` ended: release now, or return the delay after which
        the caller must call `release` (the charge stays until then, or until `reconcile`
        sees from the engine's counts that the request is gone: a client that went away,
        an answer shorter than expected)."""
        delay = self.release_delay_s(d, response_started)
        if delay <= 0.0:
            self.release(d)
            return 0.0
        d.deferred_at = clock.now()
        self._deferred.setdefault(d.target.key, deque()).append(d)
        return delay

    def awaiting_log(self, d: Decision, grace_s: float) -> float:
        """The gateway closed `d`'s stream after the routing answer and reports the
        response's end in its access log: keep the charge until that entry comes. Returns
        the delay after which the caller releases anyway (a lost entry): the predicted end
        plus `grace_s`. Not left to `reconcile`: the engine may not count the request yet
        (still on its way, or prefilled on another pod first) and would end it early."""
        if d.released:
            return 0.0
        now = clock.now()
        return self._predicted_end(d, now) - now + grace_s

    def reconcile(self, ep: Endpoint) -> None:
        """Release deferred charges on `ep` the engine cannot still be running: if a scrape
        taken after they were deferred counts fewer requests (running + waiting) than
        that, the oldest ones ended. Cheap: once per new scrape of the endpoint."""
        q = self._deferred.get(ep.key)
        if not q:
            return
        m = ep.metrics
        if m.updated_at <= ep.queue.reconciled_at:
            return
        ep.queue.reconciled_at = m.updated_at
        while q and q[0].released:
            q.popleft()
        seen = 0
        for d in q:
            if d.deferred_at > m.updated_at:
                break
            if not d.released:
                seen += 1
        excess = seen - int(m.running + m.waiting)
        while excess > 0 and q:
            d = q.popleft()
            if not d.released and d.deferred_at <= m.updated_at:
                self.release(d)
                excess -= 1

    def release(self, d: Decision | None) -> None:
        if d is None or d.released:
            return
        self._settle_prefill(d)
        d.released = True
        self.open_requests -= 1
        for hook in self._set(d).release:
            hook.release(d)

    def _settle_prefill(self, d: Decision) -> None:
        if d.prefill_settled:
            return
        d.prefill_settled = True
        for hook in self._set(d).prefill_done:
            hook.prefill_done(d)


def _float_header(headers: dict[str, str], name: str) -> float | None:
    v = headers.get(name)
    if not v:
        return None
    try:
        f = float(v)
    except ValueError:
        return None
    return f if 0 < f < math.inf else None  # inf would make SLO scores NaN
