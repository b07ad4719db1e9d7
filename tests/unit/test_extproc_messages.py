"""ext_proc message builders and readers: the wire shapes Envoy and the protocol expect."""

from __future__ import annotations

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from epp.extproc import messages as m
from epp.requestcontrol.errors import shed

DEST = "x-gateway-destination-endpoint"


def with_subset(
    value: struct_pb2.Value | None, namespace: str = m.SUBSET_NAMESPACE
) -> pb.ProcessingRequest:
    msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders())
    ns = msg.metadata_context.filter_metadata[namespace]
    if value is not None:
        ns.fields[m.SUBSET_KEY].CopyFrom(value)
    return msg


def test_subset_hint_list_form() -> None:
    v = struct_pb2.Value()
    v.list_value.values.add().string_value = "10.1.0.1:8000"
    v.list_value.values.add().string_value = "10.1.0.2:8000"
    assert m.subset_hint(with_subset(v)) == frozenset({"10.1.0.1:8000", "10.1.0.2:8000"})


def test_subset_hint_string_form() -> None:
    v = struct_pb2.Value(string_value=" 10.1.0.1:8000, 10.1.0.2:8000 ,")
    assert m.subset_hint(with_subset(v)) == frozenset({"10.1.0.1:8000", "10.1.0.2:8000"})


def test_subset_hint_empty_forms_mean_no_endpoint() -> None:
    empty_list = struct_pb2.Value(list_value=struct_pb2.ListValue())
    assert m.subset_hint(with_subset(empty_list)) == frozenset()
    assert m.subset_hint(with_subset(struct_pb2.Value(string_value=""))) == frozenset()
    assert m.subset_hint(with_subset(struct_pb2.Value(number_value=3))) == frozenset()


def test_no_subset_hint() -> None:
    assert m.subset_hint(pb.ProcessingRequest(request_headers=pb.HttpHeaders())) is None
    assert m.subset_hint(with_subset(None)) is None  # namespace without the key
    other_ns = struct_pb2.Value(string_value="10.1.0.1:8000")
    assert m.subset_hint(with_subset(other_ns, namespace="envoy.lb")) is None


def test_served_endpoint() -> None:
    msg = pb.ProcessingRequest(response_headers=pb.HttpHeaders())
    assert m.served_endpoint(msg) == ""
    msg.metadata_context.filter_metadata["envoy.lb"].fields[
        m.SERVED_KEY
    ].string_value = "10.1.0.3:8000"
    assert m.served_endpoint(msg) == "10.1.0.3:8000"
    other = pb.ProcessingRequest()
    other.metadata_context.filter_metadata["envoy.lb"].fields["unrelated"].string_value = "x"
    assert m.served_endpoint(other) == ""


def test_destination_metadata_shape() -> None:
    md = m.destination_metadata(DEST, "10.1.0.1:8000,10.1.0.2:8000")
    assert list(md.fields) == ["envoy.lb"]
    inner = md.fields["envoy.lb"].struct_value
    assert list(inner.fields) == [DEST]
    assert inner.fields[DEST].string_value == "10.1.0.1:8000,10.1.0.2:8000"


def _set_headers(mut: pb.HeaderMutation) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mut.set_headers}


def test_header_mutation_overwrites_and_removes() -> None:
    mut = m.header_mutation(
        {DEST: "10.1.0.1:8000", "x-prefiller-host-port": "10.1.0.9:8000"}, ["x-business"]
    )
    assert _set_headers(mut) == {DEST: "10.1.0.1:8000", "x-prefiller-host-port": "10.1.0.9:8000"}
    # overwrite, never append: a client-supplied destination header must not survive
    assert all(
        h.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        for h in mut.set_headers
    )
    assert all(not h.header.value for h in mut.set_headers)  # raw_value only
    assert list(mut.remove_headers) == ["x-business"]


def test_headers_response_clears_route_cache_and_carries_metadata() -> None:
    mut = m.header_mutation({DEST: "10.1.0.1:8000"}, [])
    md = m.destination_metadata(DEST, "10.1.0.1:8000")
    r = m.headers_response(mut, md)
    assert r.WhichOneof("response") == "request_headers"
    common = r.request_headers.response
    assert common.clear_route_cache
    assert _set_headers(common.header_mutation) == {DEST: "10.1.0.1:8000"}
    assert r.dynamic_metadata == md
    plain = m.headers_continue()
    assert plain.WhichOneof("response") == "request_headers"
    assert not plain.request_headers.response.clear_route_cache


def test_buffered_body_response() -> None:
    mut = m.header_mutation({DEST: "10.1.0.1:8000"}, [])
    md = m.destination_metadata(DEST, "10.1.0.1:8000")
    r = m.buffered_body_response(mut, md, None)
    assert r.WhichOneof("response") == "request_body"
    common = r.request_body.response
    assert common.clear_route_cache and _set_headers(common.header_mutation)
    assert common.status == pb.CommonResponse.CONTINUE
    assert not common.HasField("body_mutation")  # no echo of an unchanged body
    assert r.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DEST].string_value
    rw = m.buffered_body_response(mut, md, b'{"model":"b"}')
    assert rw.request_body.response.status == pb.CommonResponse.CONTINUE_AND_REPLACE
    assert rw.request_body.response.body_mutation.body == b'{"model":"b"}'


def _chunks(body: bytes, eos: bool = True) -> list[pb.StreamedBodyResponse]:
    out = []
    for r in m.streamed_body(body, eos):
        assert r.WhichOneof("response") == "request_body"
        out.append(r.request_body.response.body_mutation.streamed_response)
    return out


def test_streamed_body_small_is_one_chunk() -> None:
    (only,) = _chunks(b'{"model":"m"}')
    assert only.body == b'{"model":"m"}' and only.end_of_stream
    (empty,) = _chunks(b"")
    assert empty.body == b"" and empty.end_of_stream
    (exact,) = _chunks(b"a" * m.ECHO_CHUNK)
    assert len(exact.body) == m.ECHO_CHUNK


def test_streamed_body_splits_large_bodies_and_marks_only_last_eos() -> None:
    body = bytes(range(256)) * ((5 * m.ECHO_CHUNK // 2) // 256 + 1)  # ~2.5 MiB, not aligned
    chunks = _chunks(body)
    assert len(chunks) == 3
    assert all(len(c.body) <= m.ECHO_CHUNK for c in chunks)
    assert b"".join(c.body for c in chunks) == body
    assert [c.end_of_stream for c in chunks] == [False, False, True]
    aligned = _chunks(b"z" * (2 * m.ECHO_CHUNK))
    assert [c.end_of_stream for c in aligned] == [False, True]


def test_streamed_body_without_eos_when_trailers_follow() -> None:
    assert [c.end_of_stream for c in _chunks(b"x" * (m.ECHO_CHUNK + 1), eos=False)] == [
        False,
        False,
    ]
    assert [c.end_of_stream for c in _chunks(b"x", eos=False)] == [False]


def test_immediate_response_is_json() -> None:
    e = shed("pool saturated")
    r = m.immediate(e.status, e.body(), f"epp_{e.code}")
    ir = r.immediate_response
    assert ir.status.code == 429
    assert _set_headers(ir.headers) == {"content-type": "application/json"}
    payload = orjson.loads(ir.body)
    assert payload["error"]["code"] == "rate_limit_exceeded"
    assert payload["error"]["type"] == "rate_limit_error"
    assert "pool saturated" in payload["error"]["message"]
    assert ir.details == "epp_rate_limit_exceeded"


def test_headers_of_prefers_raw_value() -> None:
    hm = pb.HttpHeaders()
    hm.headers.headers.add(key=":path", raw_value=b"/v1/completions")
    hm.headers.headers.add(key="x-old", value="legacy")
    hm.headers.headers.add(key="x-utf", raw_value="caf\u00e9".encode())
    assert m.headers_of(hm) == {":path": "/v1/completions", "x-old": "legacy", "x-utf": "caf\u00e9"}


def test_continue_builders_name_their_phase() -> None:
    assert m.request_trailers_continue().WhichOneof("response") == "request_trailers"
    assert m.response_headers_continue().WhichOneof("response") == "response_headers"
    assert m.response_body_continue().WhichOneof("response") == "response_body"
    assert m.response_trailers_continue().WhichOneof("response") == "response_trailers"


def test_routing_answers_equal_a_fresh_answer_and_stay_bounded() -> None:
    dest, remove = "x-gateway-destination-endpoint", ("x-business", "x-slo-ttft-ms")
    answers = m.RoutingAnswers(dest, remove)
    one = answers.to("10.0.0.1:8000,10.0.0.2:8000")
    fresh = m.headers_response(
        m.header_mutation({dest: "10.0.0.1:8000,10.0.0.2:8000"}, remove),
        m.destination_metadata(dest, "10.0.0.1:8000,10.0.0.2:8000"),
    )
    assert one == fresh
    assert one.request_headers.response.clear_route_cache
    assert answers.to("10.0.0.1:8000,10.0.0.2:8000") is one  # built once, shared
    assert answers.to("10.0.0.2:8000") != one
    for i in range(m.RoutingAnswers.MAX + 10):
        answers.to(f"10.1.{i // 256}.{i % 256}:8000")
    assert len(answers._cache) <= m.RoutingAnswers.MAX


def test_answers_say_which_phase_they_answer_even_when_empty() -> None:
    """A sub-message only read, never set, is absent on the wire: Envoy would get an answer
    to no phase. Empty answers must still name theirs."""
    assert m._streamed_chunk(b"", False).WhichOneof("response") == "request_body"
    assert m._streamed_chunk(b"", False).request_body.response.body_mutation.HasField(
        "streamed_response"
    )
    assert m.headers_response(None, None).request_headers.HasField("response")
    for answer in (
        m.response_headers_continue(),
        m.response_body_continue(),
        m.request_trailers_continue(),
        m.response_trailers_continue(),
    ):
        assert answer.WhichOneof("response") is not None
