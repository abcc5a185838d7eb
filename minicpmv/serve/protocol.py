"""OpenAI chat-completions request schema (plus vLLM's extras) and the response / chunk / error bodies."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from minicpmv.engine.sampling import SamplingParams, StructuredOutputs
from minicpmv.errors import InvalidInputError
from minicpmv.output.tools import check_tool_choice
from minicpmv.processing.options import ProcessingOptions
from minicpmv.serve.openai_compat import OpenAIExtras


MAX_CHOICES = 8  # n: choices per prompt


def whole_number(cls, value):
    """(A before-validator.) 4.0 is the integer 4 (some clients write every number as a float); 4.5 and "4" stay
    errors."""
    def whole(v):
        return int(v) if isinstance(v, float) and v.is_integer() else v
    return [whole(v) for v in value] if isinstance(value, list) else whole(value)


class ChatTemplateKwargs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enable_thinking: bool = False


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(OpenAIExtras):
    """Unknown fields are refused (400) rather than ignored: nothing a client sends is silently dropped. Strict
    types: "4" is not a number and true is not 1."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    min_tokens: int | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)  # choices share one prefill
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    mm_processor_kwargs: dict[str, Any] | None = None  # ProcessingOptions' fields
    chat_template_kwargs: ChatTemplateKwargs | None = None
    normalize_escaped_newlines: bool = False  # the model card's "\\n" -> newline clean-up of content
    # Constrained output, in the spellings clients send: OpenAI's response_format, vLLM's structured_outputs and
    # its older guided_* fields (only one of them per request).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    user: str | None = None
    test_output: str | None = None  # honoured only when the server runs with test hooks enabled

    @field_validator("max_tokens", "max_completion_tokens", "top_k", "min_tokens", "n", "seed", "top_logprobs",
                     "stop_token_ids", mode="before")
    @classmethod
    def _whole_floats(cls, value):
        return whole_number(cls, value)

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, options, info):
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream=true")
        return options

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, choice):
        check_tool_choice(choice)
        return choice

    def processing_options(self) -> ProcessingOptions:
        return ProcessingOptions.from_dict(self.mm_processor_kwargs or {}, where="mm_processor_kwargs")

    def sampling_params(self) -> SamplingParams:
        given = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "max_tokens": self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens,
            "min_tokens": self.min_tokens,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logprobs": (self.top_logprobs or 0) if self.logprobs else None,
            "logit_bias": self.token_bias(),
        }
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidInputError("top_logprobs needs logprobs=true", param="top_logprobs")
        return SamplingParams(
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            structured=self.structured(),
            **{k: v for k, v in given.items() if v is not None},
        )

    def structured(self) -> StructuredOutputs | None:
        """The one output constraint the request asks for, whichever spelling it used (None: free text)."""
        found: list[StructuredOutputs] = []
        if self.response_format is not None:
            spec = StructuredOutputs.from_response_format(self.response_format)
            if spec is not None:
                found.append(spec)
        if self.structured_outputs is not None:
            found.append(StructuredOutputs.from_dict(self.structured_outputs, param="structured_outputs"))
        for name in GUIDED:
            value = getattr(self, f"guided_{name}")
            if value is not None:
                found.append(StructuredOutputs(**{name: value}, param=f"guided_{name}"))
        if len(found) > 1:
            raise InvalidInputError(f"give one output constraint, not several: {', '.join(s.param for s in found)}",
                                    param=found[1].param)
        return found[0] if found else None


GUIDED = ("json", "regex", "choice", "grammar")


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
