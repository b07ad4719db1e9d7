"""Parse an OpenAI-style request body once into an `InferenceRequest`.

The body is decoded with orjson and the prompt serialised into prefix-stable bytes for
prefix hashing: the messages of a chat are joined role by role so that turn N+1 of a
conversation starts with exactly the bytes of turn N.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from epp.datalayer.endpoint import Endpoint
from epp.requestcontrol.errors import bad_request
from epp.scheduling.request import CHARS_PER_TOKEN, InferenceRequest

_SEP = b"\x1e"  # between messages / prompt parts
_ROLE_SEP = b"\x1f"

# path suffix -> api kind
_APIS = (
    ("/chat/completions", "chat"),
    ("/completions", "completions"),
    ("/embeddings", "embeddings"),
    ("/responses", "responses"),
)


def api_of(path: str) -> str:
    p = path.split("?", 1)[0].rstrip("/")
    for suffix, kind in _APIS:
        if p.endswith(suffix):
            return kind
    return "other"


def reject_bodyless(method: str, path: str) -> None:
    """A request without a body is answered by any pod (GET /v1/models ...), except a POST
    to an inference path: that is a client error, answered here rather than by a pod."""
    if method == "POST" and api_of(path) != "other":
        raise bad_request("Request body is empty; expected a JSON object.", "invalid_body")


# Text prompts are judged by a bound no real tokenizer undercuts on a whole prompt (English
# averages ~4 bytes per token, code and other scripts fewer): a false 400 would need a prompt
# averaging more than this many bytes per token.
MAX_BYTES_PER_TOKEN = 8


def check_context_length(req: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
    """400 when the prompt (plus the requested completion) cannot fit the context window
    every candidate reports (`max_model_len`); nothing is judged while any is unknown."""
    windows = [ep.max_model_len for ep in endpoints]
    if not windows or min(windows) <= 0:
        return
    limit = max(windows)
    tokens, exact = _longest_prompt_tokens(req)
    if tokens + req.max_tokens <= limit:
        return
    what = f"{tokens} tokens" if exact else f"at least {tokens} tokens"
    asked = f" plus {req.max_tokens} completion tokens" if req.max_tokens else ""
    raise bad_request(
        f"This model's maximum context length is {limit} tokens; the prompt has {what}{asked}.",
        "context_length_exceeded",
    )


def _longest_prompt_tokens(req: InferenceRequest) -> tuple[int, bool]:
    """Tokens of the longest prompt of the request (a batch's prompts are separate
    sequences), and whether that is exact (token ids) or a lower bound (text)."""
    body = req.body
    raw = None
    if body is not None and req.api in ("completions", "embeddings"):
        raw = body.get("prompt" if req.api == "completions" else "input")
    if isinstance(raw, list) and raw:
        first = raw[0]
        if _is_token(first):
            return len(raw), True
        if isinstance(first, list):
            return max(len(p) for p in raw), True
        if isinstance(first, str):
            return max(len(p.encode()) for p in raw) // MAX_BYTES_PER_TOKEN, False
    return len(req.prompt) // MAX_BYTES_PER_TOKEN, False


def parse_body(body: bytes) -> dict[str, Any]:
    if not body:
        raise bad_request("Request body is empty; expected a JSON object.", "invalid_body")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"Request body is not valid JSON: {e}", "invalid_json") from e
    if not isinstance(data, dict):
        raise bad_request("Request body must be a JSON object.", "invalid_body")
    return data


def _text_of_content(content: Any, field: str) -> bytes:
    if content is None:
        return b""
    if isinstance(content, str):
        return content.encode()
    if isinstance(content, list):
        parts: list[bytes] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part.encode())
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text.encode())
                elif part.get("type") in ("text", "input_text", "output_text"):
                    raise bad_request(f"'{field}' text part must have a string 'text'.")
                else:  # images, audio, files: hash their serialisation for affinity
                    parts.append(orjson.dumps(part, option=orjson.OPT_SORT_KEYS))
            else:
                raise bad_request(f"'{field}' parts must be strings or objects.")
        return _SEP.join(parts)
    raise bad_request(f"'{field}' must be a string or an array of content parts.")


def _chat_prompt(messages: Any) -> bytes:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array.", "invalid_messages")
    out: list[bytes] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"'messages[{i}]' must be an object.", "invalid_messages")
        role = m.get("role")
        if not isinstance(role, str):
            raise bad_request(f"'messages[{i}].role' must be a string.", "invalid_messages")
        out.append(
            role.encode() + _ROLE_SEP + _text_of_content(m.get("content"), f"messages[{i}].content")
        )
    return _SEP.join(out) + _SEP


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)  # JSON true is not a token id


# No engine's vocabulary reaches past a signed 32-bit id; larger or negative ids can only
# crash or confuse the model server.
MAX_TOKEN_ID = (1 << 31) - 1


def _token_prompt(tokens: list[Any], field: str) -> bytes:
    if not tokens:
        raise bad_request(f"'{field}' must not be empty.")
    if not all(_is_token(t) for t in tokens):
        raise bad_request(f"'{field}' token array must contain only integers.")
    if min(tokens) < 0 or max(tokens) > MAX_TOKEN_ID:
        raise bad_request(
            f"'{field}' token ids must be between 0 and {MAX_TOKEN_ID}.", "invalid_token_id"
        )
    return b",".join(str(t).encode() for t in tokens)


def _completion_prompt(prompt: Any, field: str = "prompt") -> bytes:
    """A string, an array of strings, an array of token ids, or an array of token arrays."""
    if isinstance(prompt, str):
        return prompt.encode()
    if isinstance(prompt, list):
        if not prompt:
            raise bad_request(f"'{field}' must not be empty.")
        first = prompt[0]
        if isinstance(first, str):
            if not all(isinstance(p, str) for p in prompt):
                raise bad_request(f"'{field}' must be a string or an array of strings or tokens.")
            return _SEP.join(p.encode() for p in prompt)
        if _is_token(first):
            return _token_prompt(prompt, field)
        if isinstance(first, list):
            if not all(isinstance(p, list) for p in prompt):
                raise bad_request(f"'{field}' batch must contain only token arrays.")
            return _SEP.join(_token_prompt(p, field) for p in prompt)
    raise bad_request(f"'{field}' must be a string or an array of strings or tokens.")


def _token_count(data: dict[str, Any], api: str, prompt: bytes) -> int:
    """Token ids count exactly; text is estimated at CHARS_PER_TOKEN bytes per token."""
    raw = data.get("prompt" if api == "completions" else "input")
    if isinstance(raw, list) and raw and _is_token(raw[0]):
        return len(raw)
    if isinstance(raw, list) and raw and isinstance(raw[0], list):
        return max(1, sum(len(p) for p in raw))
    return max(1, len(prompt) // CHARS_PER_TOKEN)


def _responses_prompt(data: dict[str, Any]) -> bytes:
    parts: list[bytes] = []
    instructions = data.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_request("'instructions' must be a string.")
        parts.append(instructions.encode())
    inp = data.get("input")
    if isinstance(inp, str):
        parts.append(inp.encode())
    elif isinstance(inp, list):
        for i, item in enumerate(inp):
            if isinstance(item, dict):
                role = item.get("role", "")
                parts.append(
                    str(role).encode()
                    + _ROLE_SEP
                    + _text_of_content(item.get("content"), f"input[{i}].content")
                )
            elif isinstance(item, str):
                parts.append(item.encode())
            else:
                raise bad_request(f"'input[{i}]' must be a string or an object.")
    elif inp is None:
        raise bad_request("'input' is required.", "missing_input")
    else:
        raise bad_request("'input' must be a string or an array.")
    return _SEP.join(parts)


def _int_field(data: dict[str, Any], *names: str) -> int:
    for name in names:
        v = data.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad_request(f"'{name}' must be an integer.", "invalid_type")
        if v < 0:
            raise bad_request(f"'{name}' must not be negative.", "invalid_value")
        return int(v)
    return 0


def build_request(
    request_id: str, api: str, data: dict[str, Any], headers: dict[str, str]
) -> InferenceRequest:
    """Validate the fields the picker needs; unknown fields pass through untouched."""
    model = data.get("model")
    if model is None:
        raise bad_request("'model' is required.", "missing_model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must be a non-empty string.", "invalid_model")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", "invalid_type")
    if api == "chat":
        prompt = _chat_prompt(data.get("messages"))
        max_tokens = _int_field(data, "max_completion_tokens", "max_tokens")
    elif api == "completions":
        if "prompt" not in data:
            raise bad_request("'prompt' is required.", "missing_prompt")
        prompt = _completion_prompt(data["prompt"])
        max_tokens = _int_field(data, "max_tokens")
    elif api == "embeddings":
        if "input" not in data:
            raise bad_request("'input' is required.", "missing_input")
        prompt = _completion_prompt(data["input"], "input")
        max_tokens = 0
    elif api == "responses":
        prompt = _responses_prompt(data)
        max_tokens = _int_field(data, "max_output_tokens")
    else:
        prompt = b""
        max_tokens = _int_field(data, "max_tokens")
    user = data.get("user")
    return InferenceRequest(
        request_id=request_id,
        model=model,
        api=api,
        prompt=prompt,
        prompt_tokens=_token_count(data, api, prompt),
        max_tokens=max_tokens,
        stream=stream,
        session_key=user if isinstance(user, str) and user else None,
        headers=headers,
        body=data,
    )
