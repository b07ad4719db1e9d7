"""The P/D sidecar in-process against real simulators: allow-list parsing, the NIXL request
shapes, every failure mode (prefill 5xx / timeout / 4xx / no KV params, engine down), the
limits, and byte-for-byte pass-through."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from epp.sidecar.allowlist import StaticAllowList, TargetRefused, parse_rule, parse_target
from epp.sidecar.connectors.nixl import prefill_body
from epp.sidecar.server import Sidecar, SidecarSettings
from epp.sim import start_pool, stop_pool
from epp.sim.config import make_config
from epp.sim.pool import ServerHandle

FAST: dict[str, Any] = {
    "step_base_s": 0.002, "prefill_per_token_s": 0.000_01, "decode_per_seq_s": 0.0,
    "decode_per_ctx_token_s": 0.0, "api_overhead_s": 0.0, "port": 0,
}  # fmt: skip
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


# ---- pure parts -------------------------------------------------------------------------
def test_parse_target_accepts_ip_literals_only() -> None:
    assert parse_target("10.0.0.7:8000").hostport == "10.0.0.7:8000"
    assert parse_target("[fd00::7]:8000").hostport == "[fd00::7]:8000"
    assert parse_target("10.0.0.7:8000,10.0.0.8:8000").hostport == "10.0.0.7:8000"
    assert parse_target("http://10.0.0.7:8000").hostport == "10.0.0.7:8000"
    for bad, reason in (("prefill.svc:8000", "not_an_ip"), ("10.0.0.7", "malformed"),
                        ("10.0.0.7:0", "malformed"), ("10.0.0.7:99999", "malformed"),
                        ("", "malformed"), ("evil.com@10.0.0.7:80", "not_an_ip")):
        with pytest.raises(TargetRefused) as e:
            parse_target(bad)
        assert e.value.reason == reason, bad


def test_static_allow_list_rules() -> None:
    allow = StaticAllowList.from_text("10.0.0.0/24:8000, 10.1.0.5,[fd00::/64]:9000")
    ok = ("10.0.0.9:8000", "10.1.0.5:1234", "[fd00::1]:9000")
    no = ("10.0.0.9:8001", "10.0.1.1:8000", "10.1.0.6:1234", "[fd00::1]:8000", "[fd01::1]:9000")
    assert all(allow.allows(parse_target(t)) for t in ok)
    assert not any(allow.allows(parse_target(t)) for t in no)
    assert not StaticAllowList([]).allows(parse_target("127.0.0.1:8000"))
    with pytest.raises(ValueError):
        parse_rule("prefill-pods")


def test_nixl_prefill_request_shape() -> None:
    body = {"model": "m", "messages": [], "stream": True, "stream_options": {"x": 1},
            "max_tokens": 100, "min_tokens": 5, "kv_transfer_params": {"remote_host": "evil"}}
    out = prefill_body(body, chat=True)
    assert out["stream"] is False and "stream_options" not in out and "min_tokens" not in out
    assert out["max_tokens"] == 1 and out["max_completion_tokens"] == 1
    assert out["kv_transfer_params"] == {
        "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
        "remote_block_ids": None, "remote_host": None, "remote_port": None}
    assert body["max_tokens"] == 100 and body["stream"] is True  # the original is untouched
    assert "max_completion_tokens" not in prefill_body({"prompt": "x"}, chat=False)


# ---- in-process stack -------------------------------------------------------------------
@dataclass
class Stack:
    sidecar: Sidecar
    prefill: ServerHandle
    decode: ServerHandle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.port}"

    async def metric(self, name: str, **labels: str) -> float:
        async with aiohttp.ClientSession() as s, s.get(self.url + "/sidecar/metrics") as r:
            text = await r.text()
        return sum(
            smp.value for fam in text_string_to_metric_families(text) for smp in fam.samples
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items())
        )


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack() -> AsyncIterator[StackFactory]:
    started: list[tuple[Sidecar, list[ServerHandle]]] = []

    async def make(prefill: dict[str, Any] | None = None, **settings: Any) -> Stack:
        handles = await start_pool([
            make_config(host="127.0.0.1", role="prefill", **{**FAST, **(prefill or {})}),
            make_config(host="127.0.0.1", role="decode", **FAST),
        ])  # fmt: skip
        sc = Sidecar(SidecarSettings(port=0, engine_url=handles[1].url, **settings),
                     StaticAllowList(["127.0.0.1"]))
        await sc.start()
        started.append((sc, handles))
        return Stack(sc, handles[0], handles[1])

    yield make
    for sc, handles in started:
        await sc.stop()
        await stop_pool(handles)


def chat(content: str = "hello there", **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": 4, **kw}


async def post(url: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None,
               path: str = "/v1/chat/completions") -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with aiohttp.ClientSession() as s, s.post(
        url + path, data=data, headers={"content-type": "application/json", **(headers or {})}
    ) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


async def test_stream_passes_through_byte_for_byte(make_stack: StackFactory) -> None:
    st = await make_stack()
    body = chat(stream=True, stream_options={"include_usage": True}, max_tokens=12, seed=1)
    direct = await post(st.decode.url, body)
    st.decode.server.engine.reset_cache()
    via = await post(st.url, body)
    assert via[0] == direct[0] == 200 and via[1]["x-epp-pd"] == "local"
    strip = [(b'"id":"', b'"'), (b'"created":', b",")]  # per-response values

    def norm(raw: bytes) -> bytes:
        for start, end in strip:
            parts = raw.split(start)
            raw = parts[0] + b"".join(start + p[p.index(end):] for p in parts[1:])
        return raw

    assert norm(via[2]) == norm(direct[2])
    assert b'"usage"' in via[2] and via[2].endswith(b"data: [DONE]\n\n")
    # Not an inference path: passed through as well.
    async with aiohttp.ClientSession() as s, s.get(st.url + "/v1/models") as r:
        assert r.status == 200 and r.headers["x-sim-server"] == st.decode.address


async def test_remote_prefill_then_local_decode(make_stack: StackFactory) -> None:
    st = await make_stack()
    status, headers, raw = await post(st.url, chat("a fresh prompt " * 200),
                                      {"x-prefiller-host-port": st.prefill.address,
                                       "x-request-id": "req-42"})
    assert status == 200 and headers["x-epp-pd"] == "disaggregated"
    assert headers["x-request-id"] == "req-42" and headers["x-sim-server"] == st.decode.address
    answer = orjson.loads(raw)
    assert "kv_transfer_params" not in answer  # the client sees an ordinary response
    assert answer["usage"]["completion_tokens"] == 4
    assert st.prefill.server.prefill_only_total == 1
    assert st.decode.server.remote_prefilled_total == 1
    assert await st.metric("epp_sidecar_kv_transfers_total", connector="nixlv2") == 1
    assert await st.metric("epp_sidecar_prefill_duration_seconds_count") == 1


@pytest.mark.parametrize(("prefill", "settings", "reason"), [
    ({"error_rate": 1.0}, {}, "http_500"),
    ({"slow_factor": 2000.0}, {"prefill_timeout_s": 0.2}, "timeout"),
])  # fmt: skip
async def test_prefill_failure_falls_back_to_local_decode(
    make_stack: StackFactory, prefill: dict[str, Any], settings: dict[str, Any], reason: str
) -> None:
    st = await make_stack(prefill, **settings)
    status, headers, raw = await post(st.url, chat("fall back " * 50),
                                      {"x-prefiller-host-port": st.prefill.address})
    assert status == 200, raw
    assert headers["x-epp-pd"] == "local-fallback"
    assert st.decode.server.remote_prefilled_total == 0
    assert st.decode.server.stats.requests_ok == 1
    assert await st.metric("epp_sidecar_fallbacks_total", reason=reason) == 1
    if reason == "timeout":  # the abandoned prefill was cancelled on the prefill pod too
        for _ in range(100):
            if st.prefill.server.engine.num_running + st.prefill.server.engine.num_waiting == 0:
                break
            await asyncio.sleep(0.02)
        assert st.prefill.server.aborted_total == 1


async def test_prefill_4xx_goes_back_to_the_client(make_stack: StackFactory) -> None:
    st = await make_stack()
    body = chat()
    body["model"] = "no-such-model"
    status, headers, raw = await post(st.url, body, {"x-prefiller-host-port": st.prefill.address})
    assert status == 404 and headers["x-epp-pd"] == "prefill-error"
    assert orjson.loads(raw)["error"]["type"] == "NotFoundError"
    assert st.decode.server.requests_total == 0


async def test_prefill_answer_without_kv_params_falls_back(make_stack: StackFactory) -> None:
    """A fake prefill engine (an engine without a KV connector answers like this)."""

    async def no_connector(request: web.Request) -> web.Response:
        return web.json_response({"choices": [{"text": "x"}], "usage": {}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", no_connector)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        st = await make_stack()
        status, headers, _ = await post(st.url, chat(),
                                        {"x-prefiller-host-port": f"127.0.0.1:{port}"})
        assert status == 200 and headers["x-epp-pd"] == "local-fallback"
        assert await st.metric("epp_sidecar_fallbacks_total", reason="no_kv_params") == 1
    finally:
        await runner.cleanup()


async def test_client_kv_params_are_stripped_on_local_requests(make_stack: StackFactory) -> None:
    st = await make_stack()
    body = chat(kv_transfer_params={"do_remote_prefill": True, "remote_host": "10.9.9.9"})
    status, headers, _ = await post(st.url, body)
    assert status == 200 and headers["x-epp-pd"] == "local"
    assert st.decode.server.remote_prefilled_total == 0
    assert await st.metric("epp_sidecar_rejected_targets_total", reason="client_kv_params") == 1
    st2 = await make_stack(strip_client_kv_params=False)
    await post(st2.url, body)
    assert st2.decode.server.remote_prefilled_total == 1  # the operator opted out


async def test_limits_and_health(make_stack: StackFactory) -> None:
    st = await make_stack(max_body_bytes=4096, max_header_bytes=512)
    status, _, raw = await post(st.url, chat("x" * 5000))
    assert status == 413 and orjson.loads(raw)["error"]["code"] == "request_too_large"
    status, _, _ = await post(st.url, chat(), {"x-big": "y" * 1000})
    assert status == 400
    assert st.decode.server.requests_total == 0
    async with aiohttp.ClientSession() as s:
        for path, want in (("/healthz", 200), ("/readyz", 200)):
            async with s.get(st.url + path) as r:
                assert r.status == want, path
        await st.decode.server.stop()  # the engine goes away
        async with s.get(st.url + "/readyz") as r:
            assert r.status == 503
        async with s.get(st.url + "/healthz") as r:
            assert r.status == 200
    status, _, raw = await post(st.url, chat())
    assert status == 502 and orjson.loads(raw)["error"]["code"] == "engine_unreachable"
    assert await st.metric("epp_sidecar_engine_errors_total") == 1


async def test_refused_target_is_never_dialled(make_stack: StackFactory) -> None:
    st = await make_stack()
    hits: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(1)
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.2", 0)
    target = f"127.0.0.2:{server.sockets[0].getsockname()[1]}"
    try:
        status, headers, raw = await post(st.url, chat(), {"x-prefiller-host-port": target})
        assert status == 400 and headers["x-epp-pd"] == "rejected"
        assert orjson.loads(raw)["error"]["code"] == "prefill_target_refused"
        await asyncio.sleep(0.1)
        assert hits == [] and st.decode.server.requests_total == 0
        assert await st.metric("epp_sidecar_rejected_targets_total", reason="not_allowed") == 1
    finally:
        server.close()
        await server.wait_closed()


# ---- SGLang bootstrap connector -----------------------------------------------------------
@dataclass
class FakeSGLang:
    """A fake SGLang engine (SGLang cannot run here): records the bodies it gets; as the
    decode side it streams a few chunks, as the prefill side it answers after `delay` s."""

    bodies: list[dict[str, Any]]
    status: int = 200
    delay: float = 0.0
    cancelled: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.bodies.append(body)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if not body.get("stream"):
            return web.json_response({"choices": []}, status=self.status)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(b'data: {"choices":[{"delta":{"content":"t%d"}}]}\n\n' % i)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def start(self, host: str) -> tuple[web.AppRunner, str]:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, host, 0).start()
        return runner, f"{host}:{runner.addresses[0][1]}"


async def test_sglang_connector_sends_both_with_one_bootstrap_room() -> None:
    # The decode side waits for its KV, as SGLang's decode engine does on the room.
    prefill, decode = FakeSGLang([], delay=0.01), FakeSGLang([], delay=0.2)
    p_runner, p_addr = await prefill.start("127.0.0.2")
    d_runner, d_addr = await decode.start("127.0.0.1")
    sc = Sidecar(SidecarSettings(port=0, engine_url=f"http://{d_addr}", connector="sglang",
                                 sglang_bootstrap_port=9999), StaticAllowList(["127.0.0.2"]))
    await sc.start()
    try:
        url = f"http://127.0.0.1:{sc.port}"
        status, headers, raw = await post(url, chat(stream=True), {"x-prefiller-host-port": p_addr})
        assert status == 200 and headers["x-epp-pd"] == "disaggregated"
        assert raw.endswith(b"data: [DONE]\n\n")
        (p_body,), (d_body,) = prefill.bodies, decode.bodies
        assert p_body["bootstrap_room"] == d_body["bootstrap_room"]
        assert (p_body["bootstrap_host"], p_body["bootstrap_port"]) == ("127.0.0.2", 9999)
        assert p_body["stream"] is False and d_body["stream"] is True
        # A failing prefill side cannot fall back (the decode already runs): counted, logged.
        prefill.status = 500
        status, _, _ = await post(url, chat(stream=True), {"x-prefiller-host-port": p_addr})
        assert status == 200
        text = ""
        async with aiohttp.ClientSession() as s, s.get(url + "/sidecar/metrics") as r:
            text = await r.text()
        assert 'epp_sidecar_prefill_errors_total{reason="http_500"} 1.0' in text
        # Client bootstrap fields never reach a locally decoded request.
        await post(url, chat(bootstrap_host="10.9.9.9", bootstrap_room=1))
        assert "bootstrap_host" not in decode.bodies[-1]
    finally:
        await sc.stop()
        await p_runner.cleanup()
        await d_runner.cleanup()
