"""Render a checkpoint's Jinja chat template in a sandbox, producing the same text as transformers'
`apply_chat_template` (same environment options, filters, globals and input clean-up)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from minicpmv.errors import CheckpointError, InvalidInputError

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # Plain json.dumps: Jinja's own filter HTML-escapes characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, so templates cannot reach Python internals through it."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates cannot set underscore attributes ({name!r})")


def plain_data(value: Any) -> Any:
    """Copy `value` into plain JSON-like types; anything else (images, arrays, ...) becomes '<TypeName>'.

    Templates only test whether media keys exist, so placeholders render identically, and the sandbox never sees
    objects whose methods it cannot vet."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if isinstance(value, np.generic):  # np.bool_(False) must not become a truthy placeholder
        return plain_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict) -> dict:
    """Expose a message's reasoning under every name templates read (`reasoning_content` is the standard one)."""
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _parsed_arguments(message: dict) -> dict:
    """OpenAI clients send a tool call's ``arguments`` as a JSON string; the template iterates them as a mapping."""
    calls = message.get("tool_calls")
    return {**message, "tool_calls": [_parsed_call(c) for c in calls]} if isinstance(calls, list) else message


def _parsed_call(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        arguments = json.loads(fn["arguments"]) if fn["arguments"].strip() else {}
    except ValueError as e:
        raise InvalidInputError(f"tool call {fn.get('name')!r}: arguments are not valid JSON ({e})") from None
    if not isinstance(arguments, dict):
        raise InvalidInputError(f"tool call {fn.get('name')!r}: arguments must be a JSON object")
    return {**call, "function": {**fn, "arguments": arguments}}


class ChatTemplate:
    def __init__(self, source: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise CheckpointError(f"chat template does not compile: {e}") from e
        self.source = source

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> ChatTemplate:
        directory = Path(directory)
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(encoding="utf-8"))
        try:
            source = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{directory} has no chat template (chat_template.jinja or tokenizer_config)") from e
        if not isinstance(source, str):
            raise CheckpointError(f"{directory}/tokenizer_config.json: chat_template must be one template string")
        return cls(source)

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **variables: Any,
    ) -> str:
        """`variables` are extra template variables, e.g. enable_thinking or the special-token strings."""
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise InvalidInputError("messages must be a list of dicts")
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise InvalidInputError("tools must be a list of JSON-schema dicts")
        try:
            return self.template.render(
                messages=[_alias_reasoning(_parsed_arguments(m)) for m in plain_data(messages)],
                tools=plain_data(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **plain_data(variables),
            )
        except jinja2.TemplateError as e:
            raise InvalidInputError(f"chat template rejected the conversation: {e.message or e}") from e
        except (TypeError, ValueError, AttributeError) as e:
            raise InvalidInputError(f"chat template could not render the conversation: {e}") from e
