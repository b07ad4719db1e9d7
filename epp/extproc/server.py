"""The Envoy ext_proc servicer: protocol phases ↔ request control.

One gRPC stream per HTTP request. Request headers → (body) → decision; the decision is
answered as a header mutation (`x-gateway-destination-endpoint`, `x-prefiller-host-port`,
control headers removed) plus `envoy.lb` dynamic metadata. Body modes:

* BUFFERED: Envoy waits for our headers response, then sends the whole body; the header
  mutation rides on the body response and the body is not echoed.
* FULL_DUPLEX_STREAMED: we hold the headers response until the body's end of stream,
  then send it followed by the body (unchanged unless the model was rewritten).

The mode comes from `protocol_config` in the first message (Envoy ≥ 1.32), else the
configured default. Whatever happens on the stream, the decision's in-flight charge is
released exactly once when it ends.

With flow control, a request the saturated pool cannot take yet waits here (the stream
handler awaits its queue ticket); if Envoy cancels the stream meanwhile (the client went
away), the ticket leaves the queue. Requests that go at once never create a future.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import orjson
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp import clock
from epp.api.headers import DESTINATION_SERVED, PD_MODE, REQUEST_ID
from epp.extproc import messages as m
from epp.extproc.accesslog import LoggedResponse
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.director import Decision, Director, Ticket
from epp.requestcontrol.errors import RequestError, too_large
from epp.requestcontrol.flowcontrol.aio import AsyncFlowWaiter
from epp.requestcontrol.parse import api_of, build_request, parse_body, reject_bodyless

log = logging.getLogger(__name__)

BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
_MODE_NAMES = {"BUFFERED": BUFFERED, "FULL_DUPLEX_STREAMED": FULL_DUPLEX}
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # (absent from grpc-stubs)

# Response headers the gateway adds (manifests/gateway): upstream attempts, who answered.
_ATTEMPTS = "x-envoy-attempt-count"
_SERVED = DESTINATION_SERVED
# How long after a request's predicted end its access-log entry may still come (Envoy
# flushes batches every buffer_flush_interval) before the EPP releases it without one.
_ACCESS_LOG_GRACE_S = 5.0
_READ_RESPONSE_HEADERS = frozenset((":status", _SERVED, _ATTEMPTS, PD_MODE))

_USAGE_RE = {
    "prompt": re.compile(rb'"prompt_tokens"\s*:\s*(\d+)'),
    "completion": re.compile(rb'"completion_tokens"\s*:\s*(\d+)'),
    "cached": re.compile(rb'"cached_tokens"\s*:\s*(\d+)'),
}


@dataclass(slots=True)
class ExtProcSettings:
    default_body_mode: str = "FULL_DUPLEX_STREAMED"  # used when Envoy sends no protocol_config
    max_body_bytes: int = 16 << 20
    debug_decisions: bool = False
    # The response phase comes from the gateway's access log (epp/extproc/accesslog.py),
    # not from response headers: a stream that closes after the routing answer keeps its
    # charge until the entry comes.
    response_from_access_log: bool = False

    def mode(self) -> int:
        return int(_MODE_NAMES[self.default_body_mode])


@dataclass(slots=True)
class _Stream:
    started: float
    mode: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    path: str = ""
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    headers_at: float = 0.0
    subset: frozenset[str] | None = None
    decision: Decision | None = None
    model: str = ""
    answered: bool = False  # an immediate response ended the request
    prefill_timer: asyncio.TimerHandle | None = None
    model_restore: m.ModelNameRestore | None = None
    queued: _Queued | None = None  # waiting in flow control
    response_status: int = 0  # the model server's status, once its headers came back
    response_ended: bool = False  # the EPP saw the end of the response
    release_scheduled: bool = False


@dataclass(slots=True)
class _Queued:
    ticket: Ticket
    data: dict[str, object]
    body: bytes
    trailers: bool


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, director: Director, metrics: EppMetrics, settings: ExtProcSettings) -> None:
        self.director = director
        self.metrics = metrics
        self.settings = settings
        h = director.settings.headers
        self.dest_header = h.destination
        self.prefill_header = h.prefiller
        self.remove_always = h.control_headers()
        self.remove_no_prefill = (*h.control_headers(), h.prefiller)
        self.routing_answers = m.RoutingAnswers(self.dest_header, self.remove_no_prefill)
        self._warned_no_sidecar: set[str] = set()
        self.flow_waiter = AsyncFlowWaiter()
        self._awaiting_log: dict[str, Decision] = {}  # by request id
        self._warned_no_log = False

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> None:
        # grpc.aio's reader/writer API (`context.read` / `context.write`), not the request
        # iterator and an async generator: each of those wraps every message in one more
        # async-generator step, a measurable share of the EPP's cost per request.
        st = _Stream(started=time.perf_counter())
        read, write = context.read, context.write
        try:
            while True:
                msg = await read()
                if msg is _EOF:
                    break
                kind = msg.WhichOneof("request")
                if kind == "request_body":
                    for out in self._on_body(st, msg.request_body):
                        await write(out)
                    if st.queued is not None:
                        for out in await self._dispatched_later(st):
                            await write(out)
                elif kind == "request_headers":
                    for out in self._on_headers(st, msg):
                        await write(out)
                elif kind == "response_headers":
                    await write(self._on_response_headers(st, msg))
                elif kind == "response_body":
                    await write(self._on_response_body(st, msg.response_body))
                elif kind == "request_trailers":
                    # Trailers end the request body in FULL_DUPLEX_STREAMED mode.
                    if st.mode == FULL_DUPLEX and st.decision is None and not st.answered:
                        for out in self._decide(st, trailers=True):
                            await write(out)
                        if st.queued is not None:
                            for out in await self._dispatched_later(st):
                                await write(out)
                    await write(m.request_trailers_continue())
                elif kind == "response_trailers":
                    st.response_ended = True
                    self._finish(st)
                    await write(m.response_trailers_continue())
                if st.answered:
                    return
        finally:
            self._finish(st)

    # ---- request path ---------------------------------------------------------------------
    def _on_headers(self, st: _Stream, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        st.headers_at = time.perf_counter()
        self.metrics.phase("header_wait", st.headers_at - st.started)
        hdrs = msg.request_headers
        st.headers = m.headers_of(hdrs)
        st.path = st.headers.get(":path", "")
        if msg.HasField("protocol_config"):
            st.mode = msg.protocol_config.request_body_mode
        else:
            st.mode = self.settings.mode()
        st.subset = m.subset_hint(msg)
        if hdrs.end_of_stream:
            return self._header_only(st)
        length = st.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.settings.max_body_bytes:
            return [self._error(st, too_large(int(length), self.settings.max_body_bytes))]
        if st.mode == FULL_DUPLEX:
            return []  # the headers response waits for the body
        if st.mode == BUFFERED:
            return [m.headers_continue()]
        return [
            self._error(
                st,
                RequestError(
                    500,
                    "ext_proc body mode must be BUFFERED or FULL_DUPLEX_STREAMED",
                    "misconfigured_gateway",
                ),
            )
        ]

    def _header_only(self, st: _Stream) -> list[pb.ProcessingResponse]:
        """GET /v1/models and friends: any ready endpoint, least loaded first."""
        try:
            reject_bodyless(st.headers.get(":method", ""), st.path)
            ep = self.director.pick_any(st.headers.get("x-request-id", ""))
        except RequestError as e:
            return [self._error(st, e)]
        mutation = m.header_mutation({self.dest_header: ep.key}, self.remove_no_prefill)
        return [m.headers_response(mutation, m.destination_metadata(self.dest_header, ep.key))]

    def _on_body(self, st: _Stream, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        if st.decision is not None or st.answered or st.queued is not None:
            return []
        if body.body:
            st.chunks.append(body.body)
            st.size += len(body.body)
            if st.size > self.settings.max_body_bytes:
                return [self._error(st, too_large(st.size, self.settings.max_body_bytes))]
        if not body.end_of_stream:
            return []
        return self._decide(st)

    def _decide(self, st: _Stream, trailers: bool = False) -> list[pb.ProcessingResponse]:
        """Pick now, or leave the request queued in `st.queued` (then: `_dispatched_later`)."""
        t_body = time.perf_counter()
        self.metrics.phase("body_receive", t_body - st.headers_at)
        body = st.chunks[0] if len(st.chunks) == 1 else b"".join(st.chunks)
        st.chunks = []
        try:
            data = parse_body(body)
            headers = st.headers
            request_id = headers.get("x-request-id") or uuid.uuid4().hex
            req = build_request(request_id, api_of(st.path), data, headers)
            st.model = req.model
            self.director.apply_headers(req, headers)
            req.subset = st.subset
            t_parsed = time.perf_counter()
            self.metrics.phase("parse", t_parsed - t_body)
            admitted = self.director.admission(req)
            t_admitted = time.perf_counter()
            self.metrics.phase("admission", t_admitted - t_parsed)
            outcome = self.director.dispatch(admitted)
        except RequestError as e:
            return [self._error(st, e)]
        except Exception:  # never crash the stream on a bug: answer 500 and log it
            log.exception("unexpected error while picking an endpoint")
            return [self._internal_error(st)]
        if isinstance(outcome, Ticket):
            st.queued = _Queued(outcome, data, body, trailers)
            return []
        return self._picked(st, outcome, data, body, trailers, t_admitted)

    async def _dispatched_later(self, st: _Stream) -> list[pb.ProcessingResponse]:
        """Wait for the queued request's turn (cancelled with the stream)."""
        q = st.queued
        assert q is not None
        try:
            decision = await self.flow_waiter.wait(q.ticket)
        except RequestError as e:
            return [self._error(st, e)]
        finally:
            st.queued = None
        return self._picked(st, decision, q.data, q.body, q.trailers, None)

    def _internal_error(self, st: _Stream) -> pb.ProcessingResponse:
        return self._error(
            st, RequestError(500, "internal error in the endpoint picker", "internal_error")
        )

    def _picked(
        self,
        st: _Stream,
        decision: Decision,
        data: dict[str, object],
        body: bytes,
        trailers: bool,
        t_admitted: float | None,  # None: scheduled in the flow-control queue
    ) -> list[pb.ProcessingResponse]:
        t_sched = time.perf_counter()
        if t_admitted is not None:
            self.metrics.phase("schedule", t_sched - t_admitted)
            self.metrics.scheduler_e2e.observe(t_sched - t_admitted)
        st.decision = decision
        # Until a first-token signal says otherwise (a stream's first body chunk, when Envoy
        # sends response bodies), the prefill is assumed done when predicted.
        st.prefill_timer = asyncio.get_running_loop().call_later(
            (decision.result.predicted_ttft_ms or 0.0) / 1000.0,
            self.director.prefill_elapsed,
            decision,
        )
        new_body = self._rewrite(data, decision)
        out = self._answer(st, decision, body, new_body, trailers)
        self.metrics.phase("respond", time.perf_counter() - t_sched)
        self._record(decision)
        return out

    def _rewrite(self, data: dict[str, object], d: Decision) -> bytes | None:
        if d.rewritten_model is None:
            return None
        data["model"] = d.rewritten_model
        return orjson.dumps(data)

    def _answer(
        self,
        st: _Stream,
        d: Decision,
        body: bytes,
        new_body: bytes | None,
        trailers: bool,
    ) -> list[pb.ProcessingResponse]:
        res = d.result
        dest = ",".join(ep.key for ep in res.primary)
        set_headers = {self.dest_header: dest}
        if res.prefill is not None:
            set_headers[self.prefill_header] = res.prefill.key
            remove = self.remove_always
        else:
            remove = self.remove_no_prefill
        if new_body is not None:
            set_headers["content-length"] = str(len(new_body))
        if REQUEST_ID not in st.headers:
            # The id the decision is logged under, for the sidecar's and engine's logs too.
            set_headers[REQUEST_ID] = d.request.request_id
        if st.mode == BUFFERED:
            mutation = m.header_mutation(set_headers, remove)
            metadata = m.destination_metadata(self.dest_header, dest)
            return [m.buffered_body_response(mutation, metadata, new_body)]
        if len(set_headers) == 1:  # only the destination (no prefill hop): a shared answer
            out = [self.routing_answers.to(dest)]
        else:
            mutation = m.header_mutation(set_headers, remove)
            out = [m.headers_response(mutation, m.destination_metadata(self.dest_header, dest))]
        out.extend(m.streamed_body(new_body if new_body is not None else body, not trailers))
        return out

    def _error(self, st: _Stream, e: RequestError) -> pb.ProcessingResponse:
        st.answered = True
        self.metrics.request_errors.labels(st.model, st.model, e.reason).inc()
        if e.status >= 500:
            log.warning("request failed: %s", e.message, extra={"status": e.status})
        return m.immediate(e.status, e.body(), f"epp_{e.code}", e.headers)

    def _record(self, d: Decision) -> None:
        req, res = d.request, d.result
        mt = self.metrics
        mt.requests.labels(req.model, req.routed_model).inc()
        mt.picks.labels(res.target.key, "decode").inc()
        if res.prefill is not None:
            mt.picks.labels(res.prefill.key, "prefill").inc()
        if req.prompt_tokens:
            mt.prefix_hits.observe(1.0 - min(1.0, res.uncached_tokens / req.prompt_tokens))
        if res.slo_met is not None:
            mt.slo_predictions.labels("true" if res.slo_met else "false").inc()
        if res.pd is not None:
            mt.pd_decision(res.pd.decision, res.pd.reason)
        if self.settings.debug_decisions:
            log.info(
                "decision",
                extra={
                    "request_id": req.request_id,
                    "model": req.routed_model,
                    "target": res.target.key,
                    "prefill": res.prefill.key if res.prefill else None,
                    "uncached_tokens": res.uncached_tokens,
                    "predicted_ttft_ms": res.predicted_ttft_ms,
                    "slo_met": res.slo_met,
                    "pd": None if res.pd is None else {
                        "decision": res.pd.decision,
                        "reason": res.pd.reason,
                        "local_uncached": res.pd.local_uncached,
                        "remote_uncached": res.pd.remote_uncached,
                        "local_ms": res.pd.local_ms,
                        "remote_ms": res.pd.remote_ms,
                    },
                    "scores": {
                        name: {"total": p.scores, "plugins": p.per_plugin}
                        for name, p in res.profiles.items()
                    },
                },
            )

    # ---- response path --------------------------------------------------------------------
    def _on_response_headers(self, st: _Stream, msg: pb.ProcessingRequest) -> pb.ProcessingResponse:
        d = st.decision
        if d is None:
            return m.response_headers_continue()
        now = clock.now()
        self.metrics.ttft.labels(d.request.model).observe(now - d.started)
        if not d.request.stream:
            # Headers of a non-streamed answer come at its end: not a TTFT to learn from.
            # (A stream's headers come before its first token: they say nothing.)
            self._cancel_timer(st)
            self.director.first_byte(d, now, learn=False)
        status = 0
        pd_mode = ""
        for h in msg.response_headers.headers.headers:
            key = h.key
            if key not in _READ_RESPONSE_HEADERS:
                continue
            raw = h.raw_value or h.value.encode()
            if key == ":status":
                status = int(raw) if raw.isdigit() else 0
            elif key == _SERVED:
                d.served = raw.decode(errors="replace")
            elif key == _ATTEMPTS:
                d.attempts = int(raw) if raw.isdigit() else 0
            else:
                pd_mode = raw.decode(errors="replace")
        if not d.served:  # the protocol's way: envoy.lb metadata set by the gateway's LB
            d.served = m.served_endpoint(msg)
        st.response_status = status
        self._response_status(d, status, pd_mode)
        if msg.response_headers.end_of_stream:
            st.response_ended = True
            self._finish(st)
        elif d.rewritten_model is not None:
            # The client asked for another name: give it back in the response body.
            st.model_restore = m.ModelNameRestore(d.rewritten_model, d.request.model)
            return m.response_headers_with_body(buffered=not d.request.stream)
        return m.response_headers_continue()

    def _response_status(self, d: Decision, status: int, pd_mode: str) -> None:
        """The model server's answer status (from its response headers or the access log)
        to the P/D outcome metric and the request-control hooks."""
        if d.result.prefill is not None:
            self._pd_outcome(d, pd_mode, status)
        self.director.response_headers(d, status)

    def _pd_outcome(self, d: Decision, pd_mode: str, status: int) -> None:
        """What the decode pod's P/D sidecar did with a prefill pod the EPP named (its
        `x-epp-pd` answer); no header on a success means no sidecar acted on it."""
        if not pd_mode:
            pd_mode = "no-sidecar" if 200 <= status < 300 else "error"
            target = d.result.target.key
            if pd_mode == "no-sidecar" and target not in self._warned_no_sidecar:
                self._warned_no_sidecar.add(target)
                log.warning(
                    "a prefill pod was named but the decode pod answered without the P/D "
                    "sidecar's x-epp-pd header: its requests are prefilled locally",
                    extra={"request_id": d.request.request_id, "target": target},
                )
        self.metrics.pd_outcome(pd_mode)

    # ---- response path from the access log ------------------------------------------------
    def _await_log(self, st: _Stream, d: Decision) -> None:
        delay = self.director.awaiting_log(d, _ACCESS_LOG_GRACE_S)
        # A client that reuses a request id while its first request runs: the newer one
        # takes the entry; the older one is released by its timer.
        self._awaiting_log[d.request.request_id] = d
        st.release_scheduled = True
        asyncio.get_running_loop().call_later(delay, self._log_missing, d)

    def _log_missing(self, d: Decision) -> None:
        rid = d.request.request_id
        if self._awaiting_log.get(rid) is d:
            del self._awaiting_log[rid]
            self.metrics.access_log["missing"].inc()
            if not self._warned_no_log:
                self._warned_no_log = True
                log.warning(
                    "--response-from-access-log: no access-log entry came for a request by "
                    "its predicted end; is the gateway's http_grpc access log sent to this "
                    "EPP? (epp_access_log_responses_total counts them)",
                    extra={"request_id": rid},
                )
        self.director.release(d)

    def response_logged(self, r: LoggedResponse) -> None:
        """The gateway's access-log entry of a request: what the response headers would
        have said, and its end."""
        d = self._awaiting_log.pop(r.request_id, None)
        if d is None:
            self.metrics.access_log["unmatched"].inc()
            return
        self.metrics.access_log["matched"].inc()
        model = d.request.model
        if r.first_byte_s is not None:
            self.metrics.ttft.labels(model).observe(r.first_byte_s)
        if not d.request.stream:
            self.director.first_byte(d, learn=False)
        if r.served:
            d.served = r.served
        d.attempts = r.attempts
        self._response_status(d, r.status, r.pd_mode)
        self.director.release(d)
        if r.duration_s is not None:
            self.metrics.request_duration.labels(model, d.request.routed_model).observe(
                r.duration_s
            )

    def _on_response_body(self, st: _Stream, body: pb.HttpBody) -> pb.ProcessingResponse:
        d = st.decision
        if d is None:
            return m.response_body_continue()
        chunk = body.body
        out = (
            st.model_restore.response(chunk)
            if st.model_restore is not None
            else m.response_body_continue()
        )
        req = d.request
        if req.stream and not d.first_byte_at and chunk:
            self._cancel_timer(st)
            now = clock.now()
            self.director.first_byte(d, now, learn=True)
            if req.slo_ttft_ms is not None:  # as the client saw it: queue wait included
                ttft_ms = 1000.0 * (d.queue_wait_s + now - d.started)
                self._slo(d, "ttft", ttft_ms <= req.slo_ttft_ms)
        if b'"usage"' in chunk:
            usage = {k: rx.findall(chunk) for k, rx in _USAGE_RE.items()}
            model = req.model
            if usage["completion"]:
                out_tokens = int(usage["completion"][-1])
                self.metrics.output_tokens.labels(model).inc(out_tokens)
                self.director.complete(d, out_tokens)
                if req.slo_tpot_ms is not None and req.stream and d.first_byte_at:
                    tpot_ms = 1000.0 * (clock.now() - d.first_byte_at) / max(1, out_tokens - 1)
                    self._slo(d, "tpot", tpot_ms <= req.slo_tpot_ms)
            if usage["prompt"]:
                self.metrics.input_tokens.labels(model).inc(int(usage["prompt"][-1]))
            if usage["cached"]:
                reported = int(usage["cached"][-1])
                self.metrics.cached_tokens.labels(model).inc(reported)
                self._check_prediction(d, reported)
        if body.end_of_stream:
            st.response_ended = True
            self._finish(st)
        return out

    def _slo(self, d: Decision, kind: str, met: bool) -> None:
        req = d.request
        self.metrics.slo(req.objective or "", req.business or "", kind, met)

    def _check_prediction(self, d: Decision, reported: int) -> None:
        """The engine's cached tokens vs what the EPP predicted for the chosen endpoint (not
        after a remote prefill: the decode pod then reports the transferred KV)."""
        res = d.result
        if res.predicted_cached_tokens is None or res.prefill is not None:
            return
        services = self.director.scheduler.services
        precise = services.precise
        block = (
            precise.block_size
            if precise is not None and res.prediction_mode == "precise"
            else services.prefix_index.block_tokens
        )
        self.metrics.prefix_prediction(
            res.prediction_mode, res.predicted_cached_tokens, reported, block
        )

    @staticmethod
    def _cancel_timer(st: _Stream) -> None:
        if st.prefill_timer is not None:
            st.prefill_timer.cancel()
            st.prefill_timer = None

    def _finish(self, st: _Stream) -> None:
        # A charge that outlives the stream keeps its prefill timer: nothing else will say
        # when the prefill is done (the stream's headers come before its first token).
        d = st.decision
        if st.release_scheduled:
            return
        if d is None or d.released:
            self._cancel_timer(st)
            return
        if self.settings.response_from_access_log and not st.response_status:
            self._await_log(st, d)
            return
        started = 200 <= st.response_status < 300 and not st.response_ended
        delay = self.director.stream_closed(d, started)
        if delay > 0.0:
            # The stream closed with the response still running (the gateway sends the
            # EPP nothing after its headers): the pod keeps working on it for a while.
            st.release_scheduled = True
            asyncio.get_running_loop().call_later(delay, self.director.release, d)
        else:
            self._cancel_timer(st)
        self.metrics.request_duration.labels(d.request.model, d.request.routed_model).observe(
            clock.now() - d.started
        )
