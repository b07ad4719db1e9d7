"""The response phase from Envoy's access log: entries parsed, matched to decisions by
request id, and a request whose entry never comes released after its predicted end."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from envoy.config.core.v3 import address_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.extproc import server
from epp.extproc.accesslog import LoggedResponse, parse_entry
from epp.extproc.server import ExtProcServicer, ExtProcSettings
from epp.observability.metrics import EppMetrics
from tests.unit.test_fuzz import _Context, _headers, assert_nothing_in_flight, make_director


def test_parse_entry_reads_what_the_response_headers_would_have_said() -> None:
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.request.request_id = "rid-1"
    e.response.response_code.value = 503
    e.response.response_headers["x-epp-pd"] = "local-fallback"
    c = e.common_properties
    c.upstream_remote_address.socket_address.CopyFrom(
        address_pb2.SocketAddress(address="10.0.0.7", port_value=8000)
    )
    c.upstream_request_attempt_count = 2
    c.time_to_first_upstream_rx_byte.FromMilliseconds(120)
    c.duration.FromMilliseconds(1500)
    assert parse_entry(e) == LoggedResponse("rid-1", 503, "10.0.0.7:8000", 2, "local-fallback",
                                            0.12, 1.5)  # fmt: skip


def test_parse_entry_of_a_request_no_upstream_answered() -> None:
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.request.request_id = "rid-2"
    assert parse_entry(e) == LoggedResponse("rid-2", 0, "", 0, "", None, None)


def _request(rid: str) -> list[pb.ProcessingRequest]:
    body = orjson.dumps({"model": "m", "prompt": "hello " * 20, "stream": True})
    return [
        _headers({":method": "POST", ":path": "/v1/completions", "x-request-id": rid}, end=False),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
    ]


async def test_charge_held_until_the_entry_then_released() -> None:
    director, pool = make_director()
    metrics = EppMetrics()
    s = ExtProcServicer(director, metrics, ExtProcSettings(response_from_access_log=True))
    await s.Process(None, _Context(_request("rid-a")))  # type: ignore[arg-type]
    assert director.open_requests == 1  # the stream closed after the answer; still charged
    s.response_logged(LoggedResponse("someone-else", 200, "", 1, "", None, None))
    assert director.open_requests == 1
    served = next(ep.key for ep in pool if ep.inflight.requests)
    s.response_logged(LoggedResponse("rid-a", 200, served, 1, "", 0.05, 0.4))
    assert_nothing_in_flight(director, pool)
    matched = metrics.access_log["matched"]._value.get()  # type: ignore[attr-defined]
    unmatched = metrics.access_log["unmatched"]._value.get()  # type: ignore[attr-defined]
    assert (matched, unmatched) == (1, 1)


async def test_without_the_flag_the_stream_end_releases() -> None:
    director, pool = make_director()
    s = ExtProcServicer(director, EppMetrics(), ExtProcSettings())
    await s.Process(None, _Context(_request("rid-b")))  # type: ignore[arg-type]
    assert_nothing_in_flight(director, pool)


async def test_a_lost_entry_is_released_after_the_predicted_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "_ACCESS_LOG_GRACE_S", 0.2)
    director, pool = make_director()
    metrics = EppMetrics()
    s = ExtProcServicer(director, metrics, ExtProcSettings(response_from_access_log=True))
    await s.Process(None, _Context(_request("rid-c")))  # type: ignore[arg-type]
    assert director.open_requests == 1
    for _ in range(100):
        if not director.open_requests:
            break
        await asyncio.sleep(0.05)
    assert_nothing_in_flight(director, pool)
    assert metrics.access_log["missing"]._value.get() == 1  # type: ignore[attr-defined]
    # The entry that comes too late finds nothing to release.
    s.response_logged(LoggedResponse("rid-c", 200, "", 1, "", None, None))
    assert metrics.access_log["unmatched"]._value.get() == 1  # type: ignore[attr-defined]
