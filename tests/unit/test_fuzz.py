"""Property-based fuzzing of the request path (Hypothesis): bodies and control headers.

1. parse + admission + scheduling + release, 10k examples: only `RequestError`s escape,
   each an OpenAI JSON error with a 4xx/503 status, and nothing stays charged in flight.
2. Whole ext_proc streams through `ExtProcServicer.Process` (the real servicer, driven with
   the protobuf messages Envoy sends): every stream is answered by a routing decision or an
   OpenAI error, never an internal error, and in-flight returns to 0.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from typing import Any

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epp.datalayer.datastore import Datastore, ModelInfo, Objective, TargetModel
from epp.datalayer.endpoint import Endpoint
from epp.extproc.server import ExtProcServicer, ExtProcSettings
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.config import build_request_control
from epp.requestcontrol.director import Decision, Director
from epp.requestcontrol.errors import RequestError
from epp.requestcontrol.parse import api_of, build_request, parse_body

PATHS = [
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/models",
    "/v1/completions?x=1",
    "/",
]
ERROR_STATUSES = {400, 404, 413, 429, 503}

# ---- strategies ------------------------------------------------------------------------
# Hypothesis spends most of its time generating; to run 10k examples in seconds, each field
# is drawn as an index into a pool of interesting values (built once, seeded), plus a little
# free text and raw bytes drawn directly.
_RNG = random.Random(14)


def _junk(depth: int = 0) -> Any:
    r = _RNG.random()
    if depth < 2 and r < 0.15:
        return [_junk(depth + 1) for _ in range(_RNG.randint(0, 3))]
    if depth < 2 and r < 0.3:
        return {_RNG.choice(["a", "text", "type", "role", ""]): _junk(depth + 1)}
    return _RNG.choice(
        [None, True, False, 0, -1, 1 << 63, 1 << 70, -(1 << 70), 1.5, -0.0, 1e308, "", "x", "é\x00"]
    )


JUNK = [_junk() for _ in range(40)]
TOKENS = [[0], [1, 2, 3], [-1], [5, -7], [(1 << 31) - 1], [1 << 31], [True, 1], [1.0], [], [1] * 70]
TEXTS = ["", "hello", "x" * 600, "é" * 100, "\u0000", "a\nb"]
CONTENT_PARTS = [
    {"type": "text", "text": "hi"},
    {"type": "text", "text": 3},
    {"type": "text"},
    {"type": "input_text", "text": None},
    {"type": "image_url", "image_url": {"url": "data:"}},
    "plain",
    7,
]
CONTENTS = [*TEXTS, None, *([p] for p in CONTENT_PARTS), CONTENT_PARTS, *JUNK[:10]]
MESSAGES = [{"role": "user", "content": c} for c in CONTENTS] + [
    {"role": 1, "content": "x"},
    {"content": "x"},
    "user",
    None,
    {},
]
POOLS: dict[str, list[Any]] = {
    "model": ["m", "m", "served", "alias", "m", "unknown", "m", "", 7, None, ["m"], {"m": 1}],
    "prompt": [
        *TEXTS,
        *TOKENS,
        [[1, 2], [3]],
        [[1], [-2]],
        [[1], "x"],
        ["a", "b"],
        ["a", 1],
        *JUNK,
    ],
    "messages": [],
    "input": [*TEXTS, *TOKENS, [MESSAGES[0], "x"], [MESSAGES[-1]], *JUNK[:10]],
    "instructions": ["be brief", 3, None, ["x"]],
    "max_tokens": [0, 1, 16, 60, 61, 10_000, 1 << 40, -1, "ten", 1.5, True, None],
    "max_completion_tokens": [5, -3, "x", None, 1 << 62],
    "max_output_tokens": [5, -3, "x", None],
    "stream": [True, False, None, "yes", 1],
    "user": ["u1", "", 5, None],
    "stream_options": [{"include_usage": True}, "x"],
}
POOLS["messages"] = [[]] + [[m] for m in MESSAGES] + [MESSAGES[:3], "hi", None, *JUNK[:10]]
FIELDS = sorted(POOLS)
RAW_BODIES = [b"", b"null", b"[]", b"1", b'"x"', b"{", b'{"model": "m", "prompt": "x"', b"\xff\xfe"]


def decode_body(g: int) -> bytes:
    """A 64-bit genome → a request body: its kind, which fields it has and which pool value
    each takes. One integer draw per example keeps Hypothesis fast (10k examples in
    seconds) and still shrinks toward simple bodies (genome 0)."""
    kind, g = g & 15, g >> 4
    if kind == 0:
        return RAW_BODIES[g % len(RAW_BODIES)]
    if kind == 1:
        return g.to_bytes(8, "little")[: g % 9]
    mask, g = g & ((1 << len(FIELDS)) - 1), g >> len(FIELDS)
    d: dict[str, Any] = {}
    for i, f in enumerate(FIELDS):
        # model and the prompt fields are present most of the time, the rest by the mask
        if mask >> i & 1 or (f in ("model", "prompt", "messages", "input") and kind > 3):
            pool = POOLS[f]
            d[f] = pool[(g * (2 * i + 1) + (g >> (3 * i))) % len(pool)] if kind != 4 else pool[0]
    return json.dumps(d).encode()  # the stdlib writes any integer; the EPP must cope


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Richer but slower: genome bodies, free text prompts, arbitrary bytes."""
    kind = draw(st.integers(min_value=0, max_value=3))
    if kind == 0:
        return draw(st.binary(max_size=48))
    body = decode_body(draw(st.integers(min_value=0, max_value=(1 << 64) - 1)))
    if kind == 1:
        text = draw(st.text(max_size=24))
        api_field = draw(st.sampled_from(["prompt", "messages", "input", "model"]))
        data = {"model": "m", api_field: text}
        return orjson.dumps(data)
    return body


HEADER_NAMES = [
    "x-business",
    "x-gateway-inference-objective",
    "x-gateway-inference-fairness-id",
    "x-gateway-model-name-rewrite",
    "x-slo-ttft-ms",
    "x-slo-tpot-ms",
    "x-session-id",
    "x-request-id",
    "content-length",
]
HEADER_VALUES = [
    "",
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1e309",
    "250",
    "batch",
    "urgent",
    "a",
    "served",
    "m",
    "99999999999999999999",
    " 5 ",
    "é",
]


def decode_headers(g: int) -> dict[str, str]:
    """A genome → a sparse set of control headers and their values."""
    return {
        name: HEADER_VALUES[(g >> (4 * i + 16)) % len(HEADER_VALUES)]
        for i, name in enumerate(HEADER_NAMES)
        if g >> i & 1 and g >> (i + 8) & 1
    }


control_headers = st.integers(min_value=0, max_value=(1 << 64) - 1).map(decode_headers)


# ---- the pool --------------------------------------------------------------------------
def make_director() -> tuple[Director, list[Endpoint]]:
    ds = Datastore()
    eps = [
        Endpoint("10.0.0.1", 8000, model="m", business="a"),
        Endpoint("10.0.0.2", 8000, model="m", role="prefill"),
        Endpoint("10.0.0.3", 8000, model="served"),
        Endpoint("10.0.0.4", 8000),  # any model
    ]
    for i, ep in enumerate(eps):
        ep.max_model_len = 0 if i == 2 else 64  # "served" does not say
        ds.upsert_endpoint("fuzz", ep)
    ds.replace_models(
        "fuzz", [ModelInfo("alias", target_models=(TargetModel("served", 1), TargetModel("m", 1)))]
    )
    ds.replace_objectives([Objective("batch", -1), Objective("urgent", 5)])
    rc = build_request_control(None)
    return Director(ds, rc.scheduler, hooks=rc.hooks, rng=random.Random(0)), eps


def assert_nothing_in_flight(d: Director, eps: list[Endpoint]) -> None:
    assert d.open_requests == 0
    for ep in eps:
        inf = ep.inflight
        assert (inf.requests, inf.tokens, inf.pending_requests) == (0, 0, 0), ep.key
        assert (inf.prefill_requests, inf.prefill_tokens, inf.pending_prefill_tokens) == (0, 0, 0)


def check_error(e: RequestError) -> None:
    assert e.status in ERROR_STATUSES, (e.status, e.message)
    err = orjson.loads(e.body())["error"]
    assert set(err) >= {"message", "type", "code"}


# ---- 1. parse + admission --------------------------------------------------------------
DIRECTOR, POOL = make_director()


@settings(
    max_examples=10_000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(genome=st.integers(min_value=0, max_value=(1 << 128) - 1))
def test_parse_and_admission_never_raise_anything_but_request_errors(genome: int) -> None:
    body = decode_body(genome & ((1 << 64) - 1))
    headers = decode_headers(genome >> 64)
    path = PATHS[(genome >> 120) % len(PATHS)]
    d = DIRECTOR
    decision: Decision | None = None
    try:
        data = parse_body(body)
        req = build_request("rid", api_of(path), data, headers)
        d.apply_headers(req, headers)
        decision = d.admit(req)
        assert decision.result.primary, "a decision names at least the target"
        assert len({ep.key for ep in decision.result.primary}) == len(decision.result.primary)
        d.response_headers(decision, 200)
    except RequestError as e:
        check_error(e)
    finally:
        d.release(decision)
    assert_nothing_in_flight(d, POOL)


# ---- 2. whole ext_proc streams -----------------------------------------------------------
class _Context:
    """Stands in for grpc.aio.ServicerContext: the reader/writer calls `Process` makes."""

    def __init__(self, msgs: list[pb.ProcessingRequest]) -> None:
        self._msgs = iter(msgs)
        self.written: list[pb.ProcessingResponse] = []

    async def read(self) -> object:
        return next(self._msgs, grpc.aio.EOF)  # type: ignore[attr-defined]

    async def write(self, message: pb.ProcessingResponse) -> None:
        self.written.append(message)


def _headers(pairs: dict[str, str], end: bool) -> pb.ProcessingRequest:
    hm = base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    )
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hm, end_of_stream=end))


def stream_messages(
    body: bytes, path: str, headers: dict[str, str], method: str, chunks: int, status: int
) -> Iterator[pb.ProcessingRequest]:
    yield _headers({":method": method, ":path": path, **headers}, end=not body)
    if body:
        step = max(1, -(-len(body) // chunks))
        parts = [body[i : i + step] for i in range(0, len(body), step)]
        for i, part in enumerate(parts):
            yield pb.ProcessingRequest(
                request_body=pb.HttpBody(body=part, end_of_stream=i == len(parts) - 1)
            )
    hm = base_pb2.HeaderMap(
        headers=[
            base_pb2.HeaderValue(key=":status", raw_value=str(status).encode()),
            base_pb2.HeaderValue(key="x-envoy-attempt-count", raw_value=b"2"),
            base_pb2.HeaderValue(key="x-gateway-destination-endpoint-served", raw_value=b"bad"),
        ]
    )
    yield pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hm, end_of_stream=True))


async def drive(servicer: ExtProcServicer, msgs: list[pb.ProcessingRequest]) -> list[Any]:
    context = _Context(msgs)
    await servicer.Process(None, context)  # type: ignore[arg-type]
    return list(context.written)


LOOP = asyncio.new_event_loop()
S_DIRECTOR, S_POOL = make_director()
SERVICER = ExtProcServicer(
    S_DIRECTOR, EppMetrics(), ExtProcSettings("FULL_DUPLEX_STREAMED", max_body_bytes=4096)
)


@settings(
    max_examples=1_500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    body=st.one_of(bodies(), st.just(b'{"model": "m", "prompt": "' + b"x" * 5000 + b'"}')),
    path=st.sampled_from(PATHS),
    headers=control_headers,
    method=st.sampled_from(["POST", "GET", "PUT"]),
    chunks=st.integers(min_value=1, max_value=3),
    status=st.sampled_from([200, 500, 503]),
)
def test_extproc_streams_end_in_a_decision_or_an_openai_error(
    body: bytes, path: str, headers: dict[str, str], method: str, chunks: int, status: int
) -> None:
    msgs = list(stream_messages(body, path, headers, method, chunks, status))
    out = LOOP.run_until_complete(drive(SERVICER, msgs))
    immediate = [r for r in out if r.WhichOneof("response") == "immediate_response"]
    if immediate:
        ir = immediate[0].immediate_response
        assert ir.status.code in ERROR_STATUSES, (ir.status.code, ir.body[:200])
        err = orjson.loads(ir.body)["error"]
        assert err["code"] != "internal_error"
    else:
        kinds = {r.WhichOneof("response") for r in out}
        assert "request_headers" in kinds, kinds  # routed: the header mutation went out
    assert_nothing_in_flight(S_DIRECTOR, S_POOL)


@pytest.fixture(autouse=True, scope="module")
def _close_loop() -> Iterator[None]:
    yield
    LOOP.close()
