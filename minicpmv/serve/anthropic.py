"""Anthropic Messages: POST /v1/messages. Content blocks (text, image, tool_use, tool_result, thinking) become chat
messages; the output parser's events become content blocks (thinking, text, tool_use) and Anthropic's event stream.
Errors are Anthropic's ``{"type": "error", "error": {...}}`` bodies (``error_body``; app.py uses it for this path);
the server's --api-key is accepted as ``x-api-key``."""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from minicpmv.engine.sampling import SamplingParams, StructuredOutputs
from minicpmv.engine.sequence import Sequence
from minicpmv.errors import InvalidInputError, MiniCPMVError
from minicpmv.llm import LLM
from minicpmv.serve.async_llm import generate, run_to_end, until_disconnect
from minicpmv.serve.blocks import Block, Blocks, Change
from minicpmv.serve.config import ServerConfig
from minicpmv.serve.errors import HTTPError, http_error
from minicpmv.serve.metrics import Metrics
from minicpmv.serve.prepare import adapter_for, json_output, prepare_chat
from minicpmv.serve.protocol import whole_number

log = logging.getLogger("minicpmv.serve")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict:
    text = f"{param}: {message}" if param and param not in message else message
    return {"type": "error", "error": {"type": ERROR_TYPES.get(code, "api_error"), "message": text}}


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = None
    top_k: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None  # a caching hint: our prefix cache is automatic
    output_config: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    test_output: str | None = None

    _whole = field_validator("max_tokens", "top_k", mode="before")(whole_number)

    @field_validator("output_config")
    @classmethod
    def _output_config(cls, value):
        if value is None:
            return value
        unknown = set(value) - {"format", "effort"}
        if unknown:
            raise ValueError(f"unknown output_config field(s) {sorted(unknown)}")
        return value  # effort: a hint for how hard to think; thinking itself is the thinking field

    def output_format(self) -> StructuredOutputs | None:
        fmt = (self.output_config or {}).get("format")
        if fmt is None:  # {"type": "json_schema", "schema": {...}}
            return None
        return json_output("output_config.format", fmt.get("schema") if isinstance(fmt, dict) else None)

    def thinking_on(self) -> bool:
        t = self.thinking
        if t is None or t.get("type") == "disabled":
            return False
        if t.get("type") not in ("enabled", "adaptive"):
            raise InvalidInputError("thinking.type must be 'enabled', 'adaptive' or 'disabled'", param="thinking.type")
        if t.get("display") not in (None, "summarized"):
            raise InvalidInputError("thinking.display 'omitted' is not supported (thinking is shown)", param="thinking.display")
        budget = t.get("budget_tokens")
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or not 0 < budget < self.max_tokens):
            raise InvalidInputError("thinking.budget_tokens must be an integer below max_tokens", param="thinking.budget_tokens")
        return True

    def chat_tools(self) -> list[dict] | None:
        if self.tools is None:
            return None
        out = []
        for i, tool in enumerate(self.tools):
            if tool.get("type") not in (None, "custom") or not isinstance(tool.get("name"), str):
                raise InvalidInputError(f"tools.{i}: only client tools with a name and input_schema are supported", param=f"tools.{i}")
            fn = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object", "properties": {}}}
            if tool.get("description"):
                fn["description"] = tool["description"]
            out.append({"type": "function", "function": fn})
        return out

    def chat_tool_choice(self) -> tuple[Any, bool | None]:
        """(OpenAI-style tool_choice, parallel_tool_calls)."""
        choice = self.tool_choice
        if choice is None:
            return None, None
        kind = choice.get("type")
        parallel = False if choice.get("disable_parallel_tool_use") else None
        if kind == "auto":
            return "auto", parallel
        if kind == "any":
            return "required", parallel
        if kind == "none":
            return "none", parallel
        if kind == "tool" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}, parallel
        raise InvalidInputError("tool_choice.type must be auto, any, none or tool (with a name)", param="tool_choice")

    def sampling_params(self) -> SamplingParams:
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "max_tokens": self.max_tokens,
                 "stop": self.stop_sequences}
        return SamplingParams(**{k: v for k, v in given.items() if v is not None}, structured=self.output_format())


def _image(block: dict, where: str) -> dict:
    source = block.get("source") or {}
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        url = f"data:{source.get('media_type', 'image/png')};base64,{source['data']}"
    elif source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise InvalidInputError(f"{where}: an image needs a base64 or url source", param=f"{where}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def to_messages(body: MessagesRequest) -> list[dict]:
    """Anthropic messages as chat messages: tool_result blocks become tool messages, tool_use blocks tool calls."""
    out: list[dict] = []
    if body.system:
        system = body.system if isinstance(body.system, str) else "".join(b.get("text", "") for b in body.system)
        out.append({"role": "system", "content": system})
    for i, m in enumerate(body.messages):
        where = f"messages.{i}"
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise InvalidInputError(f"{where}.role must be user or assistant, got {role!r}", param=f"{where}.role")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise InvalidInputError(f"{where}.content must be a string or a list of blocks", param=f"{where}.content")
        parts, calls, reasoning = [], [], ""
        for j, b in enumerate(blocks):
            bw = f"{where}.content.{j}"
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": b.get("text", "")})
            elif kind == "image" and role == "user":
                parts.append(_image(b, bw))
            elif kind == "tool_use" and role == "assistant":
                calls.append({"id": b.get("id"), "type": "function",
                              "function": {"name": b.get("name"), "arguments": json.dumps(b.get("input") or {})}})
            elif kind == "tool_result" and role == "user":
                result = b.get("content", "")
                if isinstance(result, list):
                    result = "".join(r.get("text", "") for r in result if isinstance(r, dict) and r.get("type") == "text")
                if b.get("is_error"):
                    result = f"Error: {result}"
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": result})
            elif kind == "thinking" and role == "assistant":
                reasoning += b.get("thinking", "")
            elif kind == "redacted_thinking" and role == "assistant":
                continue  # encrypted thinking of another model: nothing we can read
            else:
                raise InvalidInputError(f"{bw}: unsupported {role} content block {kind!r}", param=f"{bw}.type")
        if role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(p["text"] for p in parts)}
            if calls:
                msg["tool_calls"] = calls
            if reasoning:
                msg["reasoning_content"] = reasoning
            out.append(msg)
        elif parts:
            out.append({"role": "user", "content": parts})
    return out


class ContentBlocks:
    """Blocks as Anthropic content blocks, and each change as the stream events it means."""

    def __init__(self):
        self.blocks = Blocks()
        self.ids: dict[int, str] = {}

    def block(self, b: Block, done: bool) -> dict:
        if b.kind == "reasoning":
            return {"type": "thinking", "thinking": b.text if done else "", "signature": ""}
        if b.kind == "text":
            return {"type": "text", "text": b.text if done else ""}
        tool_id = self.ids.setdefault(b.index, "toolu_" + secrets.token_hex(12))
        return {"type": "tool_use", "id": tool_id, "name": b.name, "input": json.loads(b.text or "{}") if done else {}}

    def events(self, changes: list[Change]) -> list[dict]:
        out = []
        for c in changes:
            b = c.block
            if c.what == "open":
                out.append({"type": "content_block_start", "index": b.index, "content_block": self.block(b, False)})
            elif c.what == "delta":
                delta = {"reasoning": {"type": "thinking_delta", "thinking": c.text}, "text": {"type": "text_delta", "text": c.text},
                         "tool_call": {"type": "input_json_delta", "partial_json": c.text}}[b.kind]
                out.append({"type": "content_block_delta", "index": b.index, "delta": delta})
            else:
                out.append({"type": "content_block_stop", "index": b.index})
        return out

    def content(self) -> list[dict]:
        return [self.block(b, True) for b in self.blocks.blocks]


def router(llm: LLM, config: ServerConfig, metrics: Metrics) -> APIRouter:
    api = APIRouter()
    tok = llm.processor.tokenizer

    def stop_of(seq: Sequence, content: list[dict]) -> tuple[str, str | None]:
        """(stop_reason, the stop sequence that ended the output)."""
        if any(b["type"] == "tool_use" for b in content) and seq.finish_reason == "stop":
            return "tool_use", None
        if seq.finish_reason == "length":
            return "max_tokens", None
        whole = tok.decode(seq.output_ids)
        rest = whole[len(seq.text):] if whole.startswith(seq.text) else ""
        matched = next((s for s in seq.params.stop if rest.startswith(s)), None)
        return ("stop_sequence", matched) if matched else ("end_turn", None)

    def usage(seq: Sequence) -> dict:
        return {"input_tokens": seq.num_prompt - seq.num_cached, "output_tokens": len(seq.output_ids),
                "cache_read_input_tokens": seq.num_cached, "cache_creation_input_tokens": 0}

    @api.post("/v1/messages/count_tokens")
    async def count_tokens(body: dict[str, Any]):
        try:
            parsed = MessagesRequest(**{"max_tokens": 1, **body})
            choice, _ = parsed.chat_tool_choice()
            options = {"enable_thinking": parsed.thinking_on(), "tools": parsed.chat_tools(), "tool_choice": choice}
            seq = await prepare_chat(llm, config, to_messages(parsed), parsed.sampling_params(), options,
                                     parsed.mm_processor_kwargs)
        except MiniCPMVError as exc:
            raise http_error(exc) from None
        except ValueError as exc:  # pydantic's ValidationError
            raise HTTPError(400, str(exc).splitlines()[0] if str(exc) else "invalid request") from None
        return {"input_tokens": seq.num_prompt}

    @api.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request):
        metrics.requests += 1
        lora = adapter_for(llm, config, body.model)
        try:
            choice, parallel = body.chat_tool_choice()
            options = {"enable_thinking": body.thinking_on(), "tools": body.chat_tools(), "tool_choice": choice,
                       "parallel_tool_calls": parallel, "lora": lora}
            seq = await prepare_chat(llm, config, to_messages(body), body.sampling_params(), options,
                                     body.mm_processor_kwargs, body.test_output)
        except MiniCPMVError as exc:
            raise http_error(exc) from None
        mid = "msg_" + secrets.token_hex(12)

        def message(content: list[dict], stop: tuple[str | None, str | None]) -> dict:
            return {"id": mid, "type": "message", "role": "assistant", "model": body.model, "content": content,
                    "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage(seq)}

        if not body.stream:
            try:
                await until_disconnect(request, run_to_end(llm, seq, metrics))
            except MiniCPMVError as exc:
                raise http_error(exc) from None
            blocks = ContentBlocks()
            blocks.blocks.feed(seq.events)
            blocks.blocks.finish()
            content = blocks.content()
            metrics.prompt_tokens += seq.num_prompt
            metrics.completion_tokens += len(seq.output_ids)
            return message(content, stop_of(seq, content))

        outputs = generate(llm, seq)
        try:
            await anext(outputs)
        except MiniCPMVError as exc:
            raise http_error(exc) from None

        async def sse():
            def event(payload: dict) -> str:
                return f"event: {payload['type']}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

            blocks = ContentBlocks()
            yield event({"type": "message_start", "message": {**message([], (None, None)),
                                                             "usage": {**usage(seq), "output_tokens": 0}}})
            try:
                for e in blocks.events(blocks.blocks.feed(seq.prefix_events)):
                    yield event(e)
                async for out in outputs:
                    for e in blocks.events(blocks.blocks.feed(out.events)):
                        yield event(e)
                for e in blocks.events(blocks.blocks.finish()):
                    yield event(e)
                reason, sequence = stop_of(seq, blocks.content())
                metrics.prompt_tokens += seq.num_prompt
                metrics.completion_tokens += len(seq.output_ids)
                yield event({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                             "usage": {"output_tokens": len(seq.output_ids)}})
                yield event({"type": "message_stop"})
            except Exception as exc:  # failed mid-stream: the status line is gone, so report it in the stream
                error = http_error(exc)
                metrics.error(error.status)
                if error.status >= 500:
                    log.exception("generation failed mid-stream")
                yield event(error_body(error.message, error.kind, error.status, error.param))
            finally:
                await outputs.aclose()

        return StreamingResponse(sse(), media_type="text/event-stream")

    return api
