"""The response phase from Envoy's gRPC access log instead of ext_proc response headers.

With `response_header_mode: SKIP` and an `envoy.access_loggers.http_grpc` logger pointed
at the EPP (`epp serve --response-from-access-log`), Envoy sends nothing to the EPP after
the routing answer: no response-headers message and no answer to wait for, two ext_proc
messages and one round trip less per request. What the EPP learned from the response
headers (the status, the pod that answered, the attempts, the P/D sidecar's outcome) and
when the request ended come instead in the access log, which Envoy batches (many entries
per gRPC message, flushed every `buffer_flush_interval`).

Each entry is matched to its decision by the request id (`x-request-id`, which the
EPP's decision is keyed by). Entries of requests this process did not decide (another
replica's, an immediate error's) are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from epp.api.headers import PD_MODE

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoggedResponse:
    request_id: str
    status: int  # 0: no response (the client went away, no upstream answered)
    served: str  # "ip:port" of the upstream that answered, "" if none
    attempts: int
    pd_mode: str  # the P/D sidecar's x-epp-pd (`additional_response_headers_to_log`), or ""
    first_byte_s: float | None  # from the request's start to the upstream's first byte
    duration_s: float | None  # from the request's start to its last byte sent


def _seconds(c: accesslog_pb2.AccessLogCommon, field: str) -> float | None:
    """A Duration of the entry's timings; None when the request never got that far."""
    if not c.HasField(field):
        return None
    d = getattr(c, field)
    return float(d.seconds + d.nanos / 1e9)


def parse_entry(e: accesslog_pb2.HTTPAccessLogEntry) -> LoggedResponse:
    c = e.common_properties
    addr = c.upstream_remote_address.socket_address
    served = f"{addr.address}:{addr.port_value}" if addr.address else ""
    pd_mode = e.response.response_headers.get(PD_MODE, "")
    return LoggedResponse(
        request_id=e.request.request_id,
        status=e.response.response_code.value,
        served=served,
        attempts=c.upstream_request_attempt_count,
        pd_mode=pd_mode,
        first_byte_s=_seconds(c, "time_to_first_upstream_rx_byte"),
        duration_s=_seconds(c, "duration"),
    )


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):
    """`envoy.service.accesslog.v3.AccessLogService` on the ext_proc port: hands each HTTP
    entry to `on_response` (the ext_proc servicer's `response_logged`)."""

    def __init__(self, on_response: Callable[[LoggedResponse], None]) -> None:
        self.on_response = on_response

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[
            als_pb2.StreamAccessLogsMessage, als_pb2.StreamAccessLogsResponse
        ],
    ) -> als_pb2.StreamAccessLogsResponse:
        on_response = self.on_response
        async for msg in request_iterator:
            for entry in msg.http_logs.log_entry:
                try:
                    on_response(parse_entry(entry))
                except Exception:  # one bad entry must not end the stream of everyone's
                    log.exception(
                        "access-log entry not applied",
                        extra={"request_id": entry.request.request_id},
                    )
        return als_pb2.StreamAccessLogsResponse()
