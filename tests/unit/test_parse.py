"""Parsing OpenAI bodies once: model, prompt bytes, limits; every wrong type is a 400."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from epp.requestcontrol.errors import RequestError
from epp.requestcontrol.parse import api_of, build_request, parse_body
from epp.scheduling.prefix_index import PrefixIndex
from epp.scheduling.request import InferenceRequest


def build(
    api: str, data: dict[str, Any], headers: dict[str, str] | None = None
) -> InferenceRequest:
    return build_request("rid", api, data, headers or {})


def err(api: str, data: dict[str, Any]) -> RequestError:
    with pytest.raises(RequestError) as ei:
        build(api, data)
    assert ei.value.status == 400
    return ei.value


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", "chat"),
        ("/v1/chat/completions?x=1", "chat"),
        ("/v1/completions", "completions"),
        ("/v1/completions/", "completions"),
        ("/v1/embeddings", "embeddings"),
        ("/v1/responses", "responses"),
        ("/v1/models", "other"),
        ("", "other"),
    ],
)
def test_api_of(path: str, api: str) -> None:
    assert api_of(path) == api


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "invalid_body"),
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_body"),
        (b'"str"', "invalid_body"),
    ],
)
def test_parse_body_errors(body: bytes, code: str) -> None:
    with pytest.raises(RequestError) as ei:
        parse_body(body)
    assert (ei.value.status, ei.value.code) == (400, code)
    parsed = orjson.loads(ei.value.body())
    assert parsed["error"]["code"] == code
    assert parsed["error"]["type"] == "invalid_request_error"
    assert parsed["error"]["message"]


def test_parse_body_ok() -> None:
    assert parse_body(b'{"model": "m"}') == {"model": "m"}


def test_completions_string_prompt() -> None:
    r = build(
        "completions",
        {"model": "m", "prompt": "hello world!", "max_tokens": 7, "stream": True, "user": "u1"},
        {"h": "v"},
    )
    assert (r.model, r.api, r.prompt) == ("m", "completions", b"hello world!")
    assert r.prompt_tokens == 3  # 12 bytes / 4
    assert (r.max_tokens, r.stream, r.session_key) == (7, True, "u1")
    assert r.request_id == "rid" and r.headers == {"h": "v"}
    assert r.routed_model == "m"


def test_completions_list_and_token_prompts() -> None:
    strs = build("completions", {"model": "m", "prompt": ["ab", "cd"]}).prompt
    assert b"ab" in strs and b"cd" in strs and strs.index(b"ab") < strs.index(b"cd")
    toks = build("completions", {"model": "m", "prompt": [1, 22, 333]}).prompt
    assert toks and b"22" in toks
    batch = build("completions", {"model": "m", "prompt": [[1, 2], [3]]}).prompt
    assert batch.startswith(build("completions", {"model": "m", "prompt": [1, 2]}).prompt)
    # different token ids -> different bytes (affinity must not collapse them)
    assert toks != build("completions", {"model": "m", "prompt": [1, 22, 334]}).prompt


def test_completions_list_prompt_is_prefix_stable() -> None:
    a = build("completions", {"model": "m", "prompt": ["sys", "q1"]}).prompt
    b = build("completions", {"model": "m", "prompt": ["sys", "q1", "q2"]}).prompt
    assert b.startswith(a)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({"prompt": "x"}, "missing_model"),
        ({"model": None, "prompt": "x"}, "missing_model"),
        ({"model": "", "prompt": "x"}, "invalid_model"),
        ({"model": 3, "prompt": "x"}, "invalid_model"),
        ({"model": ["m"], "prompt": "x"}, "invalid_model"),
        ({"model": "m"}, "missing_prompt"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "invalid_type"),
        ({"model": "m", "prompt": "x", "stream": 1}, "invalid_type"),
        ({"model": "m", "prompt": "x", "max_tokens": "10"}, "invalid_type"),
        ({"model": "m", "prompt": "x", "max_tokens": 1.5}, "invalid_type"),
        ({"model": "m", "prompt": "x", "max_tokens": True}, "invalid_type"),
        ({"model": "m", "prompt": "x", "max_tokens": -1}, "invalid_value"),
    ],
)
def test_completions_field_errors(data: dict[str, Any], code: str) -> None:
    assert err("completions", data).code == code


@pytest.mark.parametrize(
    "prompt",
    [
        None,
        5,
        1.5,
        {"text": "x"},
        [],
        ["a", 1],
        [1, "a"],
        [1.5],
        [None],
        [{"a": 1}],
        [1, 2.5],
        [[]],
        [True, False],  # JSON booleans are not token ids
        [[1, 2], "a"],  # a batch mixes token arrays and strings
        [[1, 2], [["x"]]],  # token arrays nested too deep
        [[1, "a"]],
    ],
)
def test_completions_prompt_wrong_types(prompt: Any) -> None:
    e = err("completions", {"model": "m", "prompt": prompt})
    assert "prompt" in e.message


def test_chat_string_and_parts_content() -> None:
    plain = build(
        "chat",
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi there"},
            ],
            "max_tokens": 5,
            "max_completion_tokens": 9,
        },
    )
    assert plain.api == "chat"
    assert plain.max_tokens == 9  # max_completion_tokens wins
    assert b"be brief" in plain.prompt and b"hi there" in plain.prompt
    parts = build(
        "chat",
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
            ],
        },
    )
    # the same conversation hashes the same whichever content form the client used
    assert parts.prompt == plain.prompt


def test_chat_roles_are_part_of_the_prompt() -> None:
    a = build("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}]}).prompt
    b = build("chat", {"model": "m", "messages": [{"role": "assistant", "content": "x"}]}).prompt
    assert a != b


def test_chat_multimodal_and_null_content() -> None:
    img = {"type": "image_url", "image_url": {"url": "data:a"}}
    r = build(
        "chat",
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "look"}, img]},
                {"role": "assistant", "content": None, "tool_calls": []},
            ],
        },
    )
    assert b"look" in r.prompt and b"data:a" in r.prompt
    other = dict(img, image_url={"url": "data:b"})
    r2 = build(
        "chat",
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, other]}],
        },
    )
    assert r2.prompt != r.prompt


def test_chat_serialisation_is_prefix_stable_across_turns() -> None:
    turns: list[dict[str, Any]] = [{"role": "system", "content": "You are helpful. " * 20}]
    previous = b""
    for i in range(4):
        turns.append({"role": "user", "content": f"question {i} " * 10})
        cur = build("chat", {"model": "m", "messages": turns}).prompt
        assert cur.startswith(previous)
        assert len(cur) > len(previous)
        previous = cur
        turns.append({"role": "assistant", "content": [{"type": "text", "text": f"answer {i}"}]})
    # so the prefix index matches every full block of the previous turn
    idx = PrefixIndex(block_bytes=64)
    t1 = build("chat", {"model": "m", "messages": turns[:2]}).prompt
    t2 = build("chat", {"model": "m", "messages": turns[:4]}).prompt
    h1, h2 = idx.hash_prompt("m", t1), idx.hash_prompt("m", t2)
    assert h1 and h2[: len(h1)] == h1


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        (None, "invalid_messages"),
        ([], "invalid_messages"),
        ("hi", "invalid_messages"),
        ({"role": "user"}, "invalid_messages"),
        (["hi"], "invalid_messages"),
        ([{"content": "x"}], "invalid_messages"),
        ([{"role": 1, "content": "x"}], "invalid_messages"),
        ([{"role": "user", "content": 5}], "invalid_request"),
        ([{"role": "user", "content": {"text": "x"}}], "invalid_request"),
        ([{"role": "user", "content": [5]}], "invalid_request"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "invalid_request"),
        ([{"role": "user", "content": [{"type": "text"}]}], "invalid_request"),
    ],
)
def test_chat_errors(messages: Any, code: str) -> None:
    data: dict[str, Any] = {"model": "m"}
    if messages is not None:
        data["messages"] = messages
    assert err("chat", data).code == code


def test_chat_max_completion_tokens_type_checked() -> None:
    msgs = [{"role": "user", "content": "x"}]
    assert err("chat", {"model": "m", "messages": msgs, "max_completion_tokens": "9"}).code == (
        "invalid_type"
    )


def test_embeddings_input() -> None:
    assert build("embeddings", {"model": "e", "input": "some text"}).prompt == b"some text"
    assert build("embeddings", {"model": "e", "input": ["a", "b"]}).api == "embeddings"
    assert build("embeddings", {"model": "e", "input": [5, 6]}).prompt
    assert build("embeddings", {"model": "e", "input": "x"}).max_tokens == 0


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({"model": "e"}, "missing_input"),
        ({"model": "e", "input": 5}, "invalid_request"),
        ({"model": "e", "input": {"x": 1}}, "invalid_request"),
        ({"model": "e", "input": []}, "invalid_request"),
    ],
)
def test_embeddings_errors(data: dict[str, Any], code: str) -> None:
    e = err("embeddings", data)
    assert e.code == code
    assert "input" in e.message


def test_responses_input_and_instructions() -> None:
    r = build(
        "responses",
        {"model": "m", "instructions": "be terse", "input": "what?", "max_output_tokens": 11},
    )
    assert r.api == "responses" and r.max_tokens == 11
    assert r.prompt.startswith(b"be terse") and r.prompt.endswith(b"what?")
    items = build(
        "responses",
        {
            "model": "m",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "hello"}]},
                "plain",
            ],
        },
    )
    assert b"hello" in items.prompt and b"plain" in items.prompt
    # instructions change the prompt (they are the stable prefix of a conversation)
    no_instr = build("responses", {"model": "m", "input": "what?"})
    assert no_instr.prompt != r.prompt and r.prompt.endswith(no_instr.prompt)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({"model": "m"}, "missing_input"),
        ({"model": "m", "input": 5}, "invalid_request"),
        ({"model": "m", "input": [5]}, "invalid_request"),
        ({"model": "m", "input": "x", "instructions": 5}, "invalid_request"),
        ({"model": "m", "input": [{"role": "user", "content": 7}]}, "invalid_request"),
        ({"model": "m", "input": "x", "max_output_tokens": "5"}, "invalid_type"),
    ],
)
def test_responses_errors(data: dict[str, Any], code: str) -> None:
    assert err("responses", data).code == code


def test_other_api_needs_only_a_model() -> None:
    r = build("other", {"model": "m", "anything": [1, 2]})
    assert (r.api, r.prompt, r.prompt_tokens) == ("other", b"", 1)
    assert err("other", {"x": 1}).code == "missing_model"


def test_user_field_only_when_a_string() -> None:
    assert build("completions", {"model": "m", "prompt": "x", "user": 5}).session_key is None
    assert build("completions", {"model": "m", "prompt": "x", "user": ""}).session_key is None
