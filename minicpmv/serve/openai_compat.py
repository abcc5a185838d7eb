"""OpenAI chat fields beyond the core ones, and the message checks: what clients send that we accept as the OpenAI API
does, and how each maps onto our request.

- Accepted with no effect on generation (as documented): ``store`` (nothing is stored), ``metadata``,
  ``service_tier``, ``modalities`` (``["text"]`` only), ``prediction`` (a speculative-decoding hint) and ``user``.
- Implemented: ``logit_bias``, ``reasoning_effort`` (none / minimal: thinking off; low / medium / high: on), and the
  legacy ``functions`` / ``function_call`` (mapped onto tools; the answer carries ``function_call``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, field_validator

from minicpmv.errors import InvalidInputError
from minicpmv.processing.prompt import media_part

THINKING_EFFORT = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class OpenAIExtras(BaseModel):
    """Fields mixed into ChatCompletionRequest (which sets the strict, extra="forbid" config)."""

    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    modalities: list[Literal["text"]] | None = None
    prediction: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias):
        if bias is not None:
            bad = [k for k in bias if not k.strip().isdigit()]
            if bad:
                raise ValueError(f"keys must be token ids (integers as strings), got {bad[0]!r}")
        return bias

    @field_validator("function_call")
    @classmethod
    def _named(cls, call):
        if isinstance(call, dict) and not isinstance(call.get("name"), str):
            raise ValueError("must be 'none', 'auto' or {'name': FUNCTION}")
        return call

    def token_bias(self) -> dict[int, float] | None:
        return {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None

    @property
    def legacy_functions(self) -> bool:
        return self.functions is not None

    def tool_fields(self, tools, tool_choice) -> tuple[list | None, Any]:
        """(tools, tool_choice), the legacy ``functions`` / ``function_call`` turned into them."""
        if self.function_call is not None and self.functions is None:
            raise InvalidInputError("function_call needs functions", param="function_call")
        if self.functions is None:
            return tools, tool_choice
        if tools is not None:
            raise InvalidInputError("give tools or the legacy functions, not both", param="functions")
        if tool_choice is not None and self.function_call is not None:
            raise InvalidInputError("give tool_choice or the legacy function_call, not both", param="function_call")
        tools = [{"type": "function", "function": f} for f in self.functions]
        call = self.function_call
        if isinstance(call, dict):
            call = {"type": "function", "function": {"name": call["name"]}}
        return tools, call if call is not None else tool_choice

    def thinking(self, from_template_kwargs: bool | None) -> bool:
        """enable_thinking from chat_template_kwargs and reasoning_effort; they must agree when both are given."""
        if self.reasoning_effort is None:
            return bool(from_template_kwargs)
        wanted = THINKING_EFFORT[self.reasoning_effort]
        if from_template_kwargs is not None and from_template_kwargs != wanted:
            raise InvalidInputError(
                f"reasoning_effort {self.reasoning_effort!r} contradicts chat_template_kwargs.enable_thinking={from_template_kwargs}",
                param="reasoning_effort",
            )
        return wanted


def check_messages(messages: list[dict]) -> list[dict]:
    """Each message's role and content checked (the field at fault named in ``param``); the legacy spellings
    (developer role, function role, an assistant's function_call) mapped onto what the template knows."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role not in ROLES:
            raise InvalidInputError(f"{where}.role must be one of {list(ROLES)}, got {role!r}", param=f"{where}.role")
        content = m.get("content")
        if role == "user" and content is None:
            raise InvalidInputError(f"{where}: a user message needs content", param=f"{where}.content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidInputError(f"{where}.content must be a string or a list of content parts, got "
                                    f"{type(content).__name__}", param=f"{where}.content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            at = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise InvalidInputError(f"{at} must be an object, got {type(part).__name__}", param=at)
            if part.get("type") != "text" and media_part(part) is None:
                raise InvalidInputError(f"{at}.type must be text, image_url or video_url, got {part.get('type')!r}",
                                        param=f"{at}.type")
        m = dict(m)
        if role == "developer":
            m["role"] = "system"
        elif role == "function":  # a legacy function result
            m["role"] = "tool"
        if role == "assistant" and isinstance(m.get("function_call"), dict) and not m.get("tool_calls"):
            m["tool_calls"] = [{"type": "function", "function": m.pop("function_call")}]
        out.append(m)
    return out
