"""Bad input is answered by the EPP with an OpenAI 400 before any pod sees it: token ids out
of range, an empty POST body on an inference path, prompts over the pool's context window."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import web

from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint
from epp.datalayer.model_info import ModelInfoProbe, max_model_len_of
from epp.requestcontrol.errors import RequestError
from epp.requestcontrol.parse import (
    MAX_BYTES_PER_TOKEN,
    MAX_TOKEN_ID,
    build_request,
    check_context_length,
    reject_bodyless,
)


def err(fn: Any, *args: Any) -> RequestError:
    with pytest.raises(RequestError) as ei:
        fn(*args)
    assert ei.value.status == 400
    body = orjson.loads(ei.value.body())["error"]
    assert body["type"] == "invalid_request_error" and body["code"] == ei.value.code
    return ei.value


@pytest.mark.parametrize(
    "prompt",
    [[1, -1, 3], [-5], [[1, 2], [3, -4]], [MAX_TOKEN_ID + 1], [1 << 40]],
)
def test_token_ids_out_of_range_are_400(prompt: list[Any]) -> None:
    e = err(build_request, "r", "completions", {"model": "m", "prompt": prompt}, {})
    assert e.code == "invalid_token_id"
    e = err(build_request, "r", "embeddings", {"model": "m", "input": prompt}, {})
    assert e.code == "invalid_token_id"


def test_token_ids_at_the_bounds_pass() -> None:
    req = build_request("r", "completions", {"model": "m", "prompt": [0, MAX_TOKEN_ID]}, {})
    assert req.prompt_tokens == 2


@pytest.mark.parametrize(
    "path", ["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses?x=1"]
)
def test_bodyless_post_on_inference_paths_is_400(path: str) -> None:
    assert err(reject_bodyless, "POST", path).code == "invalid_body"


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/models"), ("GET", "/v1/completions"), ("POST", "/tokenize")]
)
def test_other_bodyless_requests_still_go_to_a_pod(method: str, path: str) -> None:
    reject_bodyless(method, path)


def eps(*lens: int) -> list[Endpoint]:
    out = []
    for i, n in enumerate(lens):
        ep = Endpoint(f"127.0.0.{i + 1}", 8000)
        ep.max_model_len = n
        out.append(ep)
    return out


def test_context_length_exact_for_token_ids() -> None:
    req = build_request(
        "r", "completions", {"model": "m", "prompt": [1] * 90, "max_tokens": 10}, {}
    )
    check_context_length(req, eps(100, 100))  # 90 + 10 fits exactly
    req.max_tokens = 11
    e = err(check_context_length, req, eps(100))
    assert e.code == "context_length_exceeded" and "100 tokens" in e.message
    # The largest window among the candidates counts; an unknown one means no judgement.
    check_context_length(req, eps(100, 200))
    check_context_length(req, eps(100, 0))
    # A batch: each prompt is its own sequence.
    batch = build_request("r", "completions", {"model": "m", "prompt": [[1] * 60, [2] * 60]}, {})
    check_context_length(batch, eps(100))


def test_context_length_for_text_is_a_safe_lower_bound() -> None:
    limit = 1000
    fits = "x" * (limit * MAX_BYTES_PER_TOKEN)
    check_context_length(
        build_request("r", "completions", {"model": "m", "prompt": fits}, {}), eps(limit)
    )
    over = fits + "x" * MAX_BYTES_PER_TOKEN
    chat = {"model": "m", "messages": [{"role": "user", "content": over}]}
    assert err(check_context_length, build_request("r", "chat", chat, {}), eps(limit)).code == (
        "context_length_exceeded"
    )


def test_model_list_parsing() -> None:
    assert max_model_len_of({"data": [{"id": "a", "max_model_len": 4096}, {"id": "b"}]}) == 4096
    junk_docs: list[Any] = [
        None,
        [],
        {"data": "x"},
        {"data": [1, {"max_model_len": "9"}, {"max_model_len": True}]},
    ]
    for junk in junk_docs:
        assert max_model_len_of(junk) == 0


async def test_probe_learns_max_model_len_and_survives_a_bad_answer() -> None:
    answers = [web.Response(status=500), web.json_response({"data": [{"max_model_len": 2048}]})]

    async def models(_: web.Request) -> web.Response:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    ds = Datastore()
    ep = ds.upsert_endpoint("t", Endpoint("127.0.0.1", port))
    probe = ModelInfoProbe(ds, refresh=60)
    await probe.start()
    try:
        for _ in range(100):
            if ep.max_model_len:
                break
            await asyncio.sleep(0.05)
        assert ep.max_model_len == 2048
    finally:
        await probe.stop()
        await runner.cleanup()
