"""The decode-pod sidecar: a reverse proxy in front of the local engine that runs the
prefill on another pod when the EPP names one in `x-prefiller-host-port`.

* No header: the request goes to the local engine unchanged, the answer streams back byte
  for byte (`x-epp-pd: local`).
* With the header: the target must pass the allow-list (else 400, counted, never dialled);
  the connector gets the request prefilled there and the local engine decodes
  (`x-epp-pd: disaggregated`). A failed or timed-out prefill is decoded locally
  (`x-epp-pd: local-fallback`, a metric and a warning log line); a 4xx from the prefill
  pod goes back to the client.
* The client going away cancels whatever is in flight, prefill and decode.
* Every other path (`/metrics`, `/health`, `/v1/models`, ...) is passed to the engine.
  The sidecar's own endpoints: `/healthz`, `/readyz` (the engine is healthy and the
  allow-list synced), `/sidecar/metrics`.

Log lines carry the request's `x-request-id` (the id the EPP logs its decision under).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from epp.api.headers import PD_MODE, PREFILLER, REQUEST_ID
from epp.sidecar.allowlist import AllowList, TargetRefused, parse_target
from epp.sidecar.connectors import make_connector
from epp.sidecar.connectors.base import DecodePlan, PrefillFailed, PrefillRejected, PrefillRequest
from epp.sidecar.metrics import (
    MODE_DISAGGREGATED,
    MODE_FALLBACK,
    MODE_LOCAL,
    MODE_PREFILL_ERROR,
    MODE_REJECTED,
    SidecarMetrics,
)

log = logging.getLogger("epp.sidecar")

INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions")
# Hop-by-hop headers (RFC 9110 §7.6.1) and those the proxy recomputes.
_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length",
})  # fmt: skip
_DROP_REQUEST = _HOP | {PREFILLER, "content-encoding"}  # bodies arrive decompressed
_DROP_RESPONSE = _HOP - {"content-length"}


@dataclass(slots=True)
class SidecarSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    engine_url: str = "http://127.0.0.1:8200"
    connector: str = "nixlv2"
    prefill_timeout_s: float = 30.0
    prefill_connect_timeout_s: float = 2.0
    engine_connect_timeout_s: float = 5.0
    max_body_bytes: int = 16 << 20
    max_header_bytes: int = 8190  # per header line
    max_headers: int = 128
    strip_client_kv_params: bool = True
    metrics_port: int = 0  # 0 = only /sidecar/metrics on the serving port
    sglang_bootstrap_port: int = 8998


def _error(status: int, message: str, code: str, headers: dict[str, str]) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = orjson.dumps({"error": {"message": message, "type": kind, "code": code}})
    return web.Response(
        body=body, status=status, content_type="application/json", headers=headers
    )


class Sidecar:
    def __init__(
        self,
        settings: SidecarSettings,
        allow: AllowList,
        metrics: SidecarMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.allow = allow
        self.metrics = metrics or SidecarMetrics()
        self.connector = make_connector(settings.connector, settings)
        self.engine_url = settings.engine_url.rstrip("/")
        self._engine_http: aiohttp.ClientSession | None = None
        self._prefill_http: aiohttp.ClientSession | None = None
        self._runners: list[web.AppRunner] = []
        self.port = settings.port
        self.metrics_port = settings.metrics_port

    # ---------------------------------------------------------------- lifecycle
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes)
        r = app.router
        r.add_get("/healthz", self._healthz)
        r.add_get("/readyz", self._readyz)
        r.add_get("/sidecar/metrics", self._metrics)
        for path in INFERENCE_PATHS:
            r.add_post(path, self._inference)
        r.add_route("*", "/{tail:.*}", self._passthrough)
        return app

    async def start(self) -> None:
        s = self.settings
        # Byte-for-byte: the engine's answer is never decompressed or re-encoded.
        self._engine_http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.engine_connect_timeout_s),
            auto_decompress=False,
        )
        self._prefill_http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.prefill_connect_timeout_s),
        )
        runner = web.AppRunner(
            self.app(),
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,  # a client that goes away cancels its upstreams
            max_line_size=s.max_header_bytes,
            max_field_size=s.max_header_bytes,
            max_headers=s.max_headers,
        )
        await runner.setup()
        site = web.TCPSite(runner, s.host, s.port, reuse_address=True)
        await site.start()
        self._runners.append(runner)
        if s.port == 0 and runner.addresses:
            self.port = int(runner.addresses[0][1])
        if s.metrics_port:
            mapp = web.Application()
            mapp.router.add_get("/metrics", self._metrics)
            mrunner = web.AppRunner(mapp, access_log=None, handle_signals=False)
            await mrunner.setup()
            await web.TCPSite(mrunner, s.host, s.metrics_port, reuse_address=True).start()
            self._runners.append(mrunner)

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        for http in (self._engine_http, self._prefill_http):
            if http is not None:
                await http.close()
        self._engine_http = self._prefill_http = None

    @property
    def engine_http(self) -> aiohttp.ClientSession:
        assert self._engine_http is not None, "Sidecar.start() first"
        return self._engine_http

    @property
    def prefill_http(self) -> aiohttp.ClientSession:
        assert self._prefill_http is not None, "Sidecar.start() first"
        return self._prefill_http

    # ---------------------------------------------------------------- own endpoints
    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _readyz(self, request: web.Request) -> web.Response:
        if not self.allow.ready:
            return web.Response(status=503, text="prefill allow-list not synced")
        try:
            async with self.engine_http.get(
                self.engine_url + "/health", timeout=aiohttp.ClientTimeout(total=2)
            ) as r:
                await r.read()
                if r.status == 200:
                    return web.Response(text="ok")
                return web.Response(status=503, text=f"engine /health: HTTP {r.status}")
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            return web.Response(status=503, text=f"engine unreachable: {e!r}")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    # ---------------------------------------------------------------- request path
    def _forward_headers(self, request: web.Request, request_id: str) -> dict[str, str]:
        out = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        out[REQUEST_ID] = request_id
        return out

    async def _read_body(self, request: web.Request, rid_headers: dict[str, str]) -> bytes:
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _Answer(_error(
                413, f"request body of {request.content_length} bytes exceeds the limit of "
                f"{limit} bytes", "request_too_large", rid_headers))  # fmt: skip
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _Answer(_error(
                413, f"request body exceeds the limit of {limit} bytes", "request_too_large",
                rid_headers)) from None  # fmt: skip

    async def _passthrough(self, request: web.Request) -> web.StreamResponse:
        rid = request.headers.get(REQUEST_ID) or uuid.uuid4().hex
        try:
            body = await self._read_body(request, {REQUEST_ID: rid})
        except _Answer as a:
            return a.response
        return await self._to_engine(request, body, self._forward_headers(request, rid), None)

    async def _inference(self, request: web.Request) -> web.StreamResponse:
        rid = request.headers.get(REQUEST_ID) or uuid.uuid4().hex
        rid_headers = {REQUEST_ID: rid}
        try:
            body = await self._read_body(request, rid_headers)
        except _Answer as a:
            return a.response
        headers = self._forward_headers(request, rid)
        target_header = request.headers.get(PREFILLER, "").strip()
        if not target_header:
            if self.settings.strip_client_kv_params and self.connector.client_marker in body:
                body = self._strip_client_params(body, rid)
            self.metrics.served(MODE_LOCAL)
            return await self._to_engine(request, body, headers, MODE_LOCAL)
        try:
            target = parse_target(target_header)
            if not self.allow.allows(target):
                raise TargetRefused("not_allowed", f"prefill target {target.hostport} is not "
                                    f"allowed (allowed: {self.allow.describe()})")
        except TargetRefused as e:
            self.metrics.rejected.labels(e.reason).inc()
            self.metrics.served(MODE_REJECTED)
            log.warning("prefill target refused", extra={
                "request_id": rid, "prefiller": target_header[:200], "reason": e.reason})
            return _error(400, str(e), "prefill_target_refused", {**rid_headers,
                                                                   PD_MODE: MODE_REJECTED})
        try:
            data = orjson.loads(body)
            if not isinstance(data, dict):
                raise ValueError("the request body must be a JSON object")
        except (orjson.JSONDecodeError, ValueError) as e:
            return _error(400, f"invalid JSON body: {e}", "invalid_json", rid_headers)
        preq = PrefillRequest(
            http=self.prefill_http,
            target=target.hostport,
            path=request.path_qs,
            headers=headers,
            body=data,
            chat=request.path.endswith("/chat/completions"),
            request_id=rid,
        )
        try:
            plan, mode = await self._prefill(preq)
        except _Answer as a:
            return a.response
        if plan is None:  # fallback: the original request, as the client sent it
            if self.settings.strip_client_kv_params and self.connector.client_marker in body:
                body = self._strip_client_params(body, rid)
            return await self._to_engine(request, body, headers, mode)
        try:
            return await self._to_engine(request, plan.body, headers, mode)
        finally:
            if plan.background is not None:
                await self._finish_background(plan.background, preq)

    async def _prefill(self, preq: PrefillRequest) -> tuple[DecodePlan | None, str]:
        """The connector's prefill phase. (plan, disaggregated) or (None, local-fallback);
        a 4xx from the prefill pod propagates as an _Answer."""
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.prefill_timeout_s):
                plan = await self.connector.prepare(preq)
        except PrefillFailed as e:
            return None, self._fallback(preq, e.reason, str(e), t0)
        except TimeoutError:
            msg = f"no prefill answer within {self.settings.prefill_timeout_s:g}s"
            return None, self._fallback(preq, "timeout", msg, t0)
        except PrefillRejected as e:
            self.metrics.served(MODE_PREFILL_ERROR)
            log.info("prefill pod rejected the request", extra={
                "request_id": preq.request_id, "prefiller": preq.target, "status": e.status})
            raise _Answer(web.Response(
                body=e.body, status=e.status, headers={
                    "Content-Type": e.content_type, REQUEST_ID: preq.request_id,
                    PD_MODE: MODE_PREFILL_ERROR})) from None  # fmt: skip
        except asyncio.CancelledError:
            self.metrics.cancelled.labels("prefill").inc()
            log.info("client went away during prefill; prefill request cancelled",
                     extra={"request_id": preq.request_id, "prefiller": preq.target})
            raise
        elapsed = time.monotonic() - t0
        self.metrics.prefill_duration.observe(elapsed)
        self.metrics.transfers.labels(self.connector.name).inc()
        self.metrics.served(MODE_DISAGGREGATED)
        log.info("prefilled remotely", extra={
            "request_id": preq.request_id, "prefiller": preq.target, "mode": MODE_DISAGGREGATED,
            "prefill_ms": round(elapsed * 1000, 2), **(plan.detail or {})})
        return plan, MODE_DISAGGREGATED

    def _fallback(self, preq: PrefillRequest, reason: str, message: str, t0: float) -> str:
        self.metrics.fallbacks.labels(reason).inc()
        self.metrics.served(MODE_FALLBACK)
        log.warning("remote prefill failed; decoding locally", extra={
            "request_id": preq.request_id, "prefiller": preq.target, "mode": MODE_FALLBACK,
            "reason": reason, "error": message,
            "after_ms": round((time.monotonic() - t0) * 1000, 2)})
        return MODE_FALLBACK

    async def _finish_background(self, task: asyncio.Task[None], preq: PrefillRequest) -> None:
        """The decode is over (or the client left): end a concurrent prefill, report its
        failure (the decode engine reports its own)."""
        if not task.done():
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except PrefillFailed as e:
            self.metrics.prefill_errors.labels(e.reason).inc()
            log.warning("concurrent prefill failed", extra={
                "request_id": preq.request_id, "prefiller": preq.target, "reason": e.reason,
                "error": str(e)})

    def _strip_client_params(self, body: bytes, rid: str) -> bytes:
        """A client must not steer the engine's KV pull (it would dial any remote_host)."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body  # the engine will reject it
        if isinstance(data, dict) and self.connector.strip_client_params(data):
            self.metrics.rejected.labels("client_kv_params").inc()
            log.warning("client-supplied KV transfer parameters removed",
                        extra={"request_id": rid})
            return orjson.dumps(data)
        return body

    async def _to_engine(
        self,
        request: web.Request,
        body: bytes,
        headers: dict[str, str],
        mode: str | None,
    ) -> web.StreamResponse:
        """Send to the local engine and stream its answer back unchanged."""
        rid = headers[REQUEST_ID]
        try:
            up = await self.engine_http.request(
                request.method, self.engine_url + request.path_qs, data=body, headers=headers
            )
        except asyncio.CancelledError:
            self.metrics.cancelled.labels("decode").inc()
            raise
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            self.metrics.engine_errors.inc()
            log.error("local engine unreachable", extra={"request_id": rid, "error": repr(e)})
            return _error(502, "the local model server is unreachable", "engine_unreachable",
                          {REQUEST_ID: rid})
        done = False
        try:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            _copy_headers(up.headers, resp.headers)
            resp.headers[REQUEST_ID] = rid
            if mode is not None:
                resp.headers[PD_MODE] = mode
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            done = True
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            self.metrics.cancelled.labels("decode").inc()
            log.info("client went away; engine request cancelled", extra={"request_id": rid})
            raise
        except (aiohttp.ClientError, OSError) as e:
            # The engine broke the stream: end the client's too (it must not look complete).
            log.warning("engine stream broke", extra={"request_id": rid, "error": repr(e)})
            raise
        finally:
            if done:
                up.release()
            else:
                up.close()  # drops the engine connection: the engine aborts the request


class _Answer(Exception):
    """Short-circuit with a ready response."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _copy_headers(src: CIMultiDict[str] | Any, dst: Any) -> None:
    for k, v in src.items():
        if k.lower() not in _DROP_RESPONSE:
            dst.add(k, v)


