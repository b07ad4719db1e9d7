"""Chat templates rendered the way the engines render them (Jinja2, like `transformers`).

A sandboxed environment with `trim_blocks` / `lstrip_blocks` and loop controls, a `tojson`
filter that keeps non-ASCII text, and the `raise_exception` / `strftime_now` globals that
model templates call. The template is compiled once per model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template is broken, or it refused the conversation (`raise_exception`)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str, special: Mapping[str, str] | None = None) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template does not compile: {e}") from e
        self.source = source
        self._special = dict(special or {})

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Any = None,
        documents: Any = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        context: dict[str, Any] = dict(self._special)
        if extra:
            context.update(extra)
        context.update(
            messages=[_normalise(m) for m in messages],
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            tools=tools,
            documents=documents,
        )
        try:
            text = self._template.render(**context)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e
        if continue_final_message and messages:
            # Like the engines: the reply continues the last message, so cut the template's
            # end-of-turn markup after its content.
            last = messages[-1].get("content")
            if isinstance(last, str) and last:
                cut = text.rfind(last)
                if cut >= 0:
                    text = text[: cut + len(last)]
        return text


def _normalise(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """OpenAI content parts -> one string (text parts joined by newlines), as the engines do
    for templates that expect string content."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = [
        p if isinstance(p, str) else str(p.get("text", ""))
        for p in content
        if isinstance(p, str) or (isinstance(p, dict) and isinstance(p.get("text"), str))
    ]
    out = dict(message)
    out["content"] = "\n".join(texts)
    return out
