"""OpenAI Responses: POST /v1/responses (and GET /v1/responses/{id}). Input items become chat messages, the output
parser's events become output items (reasoning, message, function_call) and the Responses event stream.

``previous_response_id`` continues a stored response: its input and output items come before the new input, so the
prompt starts with the previous one and the engine's prefix cache reuses its state. The store is in memory and
bounded (oldest first out).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, field_validator

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

STORE_SIZE = 256  # responses kept for previous_response_id
EFFORTS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True, "xhigh": True}


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stream: bool = False
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: str | None = None
    background: bool = False
    include: list[str] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    test_output: str | None = None

    _whole = field_validator("max_output_tokens", "top_k", "seed", mode="before")(whole_number)

    @field_validator("truncation")
    @classmethod
    def _truncation(cls, value):
        if value not in (None, "disabled"):
            raise ValueError("only truncation 'disabled' is supported")
        return value

    @field_validator("background")
    @classmethod
    def _background(cls, value):
        if value:
            raise ValueError("background responses are not supported")
        return value

    @field_validator("include")
    @classmethod
    def _include(cls, value):
        if value:
            raise ValueError(f"include {value} is not supported")
        return value

    def thinking(self) -> bool:
        if self.reasoning is None:
            return False
        unknown = set(self.reasoning) - {"effort", "summary", "generate_summary"}
        if unknown:
            raise InvalidInputError(f"unknown reasoning field(s) {sorted(unknown)}", param="reasoning")
        effort = self.reasoning.get("effort") or "medium"
        if effort not in EFFORTS:
            raise InvalidInputError(f"reasoning.effort must be one of {sorted(EFFORTS)}, got {effort!r}", param="reasoning.effort")
        return EFFORTS[effort]

    def output_format(self) -> StructuredOutputs | None:
        """``text.format``: text (free), json_object, or json_schema with its schema."""
        if self.text is None:
            return None
        unknown = set(self.text) - {"format", "verbosity"}
        if unknown:
            raise InvalidInputError(f"unknown text field(s) {sorted(unknown)}", param="text")
        fmt = (self.text.get("format") or {"type": "text"})
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_schema":
            return json_output("text.format", fmt.get("schema") if isinstance(fmt.get("schema"), dict) else {})
        if kind == "json_object":
            return json_output("text.format")
        if kind != "text":
            raise InvalidInputError(f"text.format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}", param="text.format")
        return None

    def chat_tools(self) -> list[dict] | None:
        if self.tools is None:
            return None
        out = []
        for i, tool in enumerate(self.tools):
            if tool.get("type") != "function":
                raise InvalidInputError(f"tools[{i}]: only function tools are supported, got type {tool.get('type')!r}", param=f"tools.{i}.type")
            fn = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
            out.append({"type": "function", "function": fn})
        return out

    def chat_tool_choice(self):
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise InvalidInputError("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}", param="tool_choice")
            return {"type": "function", "function": {"name": choice["name"]}}
        return choice

    def sampling_params(self) -> SamplingParams:
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                 "max_tokens": self.max_output_tokens}
        return SamplingParams(**{k: v for k, v in given.items() if v is not None}, structured=self.output_format())


# -- input items -> chat messages --------------------------------------------------------------------------------
def _part(part: Any, where: str) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text", "refusal"):
        return {"type": "text", "text": part.get("text", part.get("refusal"))}
    if kind == "input_image":
        if not part.get("image_url"):
            raise InvalidInputError(f"{where}: input_image needs an image_url (a URL or data URI; file ids are not supported)", param=where)
        return {"type": "image_url", "image_url": {"url": part["image_url"]}}
    raise InvalidInputError(f"{where}: unsupported content part type {kind!r}", param=where)


def to_messages(items: list[dict]) -> list[dict]:
    """Responses items (input, or a stored response's output) as chat messages."""
    messages: list[dict] = []
    reasoning: str | None = None

    def assistant() -> dict:
        nonlocal reasoning
        last = messages[-1] if messages else None
        if last is None or last["role"] != "assistant":
            last = {"role": "assistant", "content": ""}
            messages.append(last)
        if reasoning is not None:
            last["reasoning_content"] = reasoning
            reasoning = None
        return last

    for i, item in enumerate(items):
        where = f"input.{i}"
        if not isinstance(item, dict):
            raise InvalidInputError(f"{where}: an input item must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise InvalidInputError(f"{where}: role must be user, system, developer or assistant, got {role!r}", param=f"{where}.role")
            content = item.get("content")
            parts = [_part(p, f"{where}.content.{j}") for j, p in enumerate(content)] if isinstance(content, list) else content
            if role == "assistant":
                msg = assistant()
                text = parts if isinstance(parts, str) else "".join(p["text"] for p in parts if p["type"] == "text")
                msg["content"] = (msg["content"] or "") + (text or "")
            else:
                messages.append({"role": "system" if role == "developer" else role, "content": parts})
        elif kind == "reasoning":
            texts = [c.get("text", "") for c in (item.get("content") or []) + (item.get("summary") or []) if isinstance(c, dict)]
            reasoning = (reasoning or "") + "".join(texts)
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise InvalidInputError(f"{where}: a function_call needs a string {key}", param=f"{where}.{key}")
            msg = assistant()
            msg.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}})
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = "".join(p.get("text", "") for p in output if isinstance(p, dict))
            if not isinstance(item.get("call_id"), str) or not isinstance(output, str):
                raise InvalidInputError(f"{where}: a function_call_output needs a call_id and an output string", param=where)
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        else:
            raise InvalidInputError(f"{where}: unsupported input item type {kind!r}", param=f"{where}.type")
    return messages


# -- output items ------------------------------------------------------------------------------------------------
def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class OutputItems:
    """Blocks as Responses output items, and each change as the Responses stream events it means."""

    def __init__(self):
        self.blocks = Blocks()
        self.ids: dict[int, str] = {}

    def item(self, block: Block, done: bool) -> dict:
        item_id = self.ids.setdefault(block.index, _id({"reasoning": "rs", "text": "msg", "tool_call": "fc"}[block.kind]))
        status = "completed" if done else "in_progress"
        if block.kind == "reasoning":
            return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
                    "content": [{"type": "reasoning_text", "text": block.text if done else ""}]}
        if block.kind == "text":
            content = [self.part(block)] if done else []
            return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": content}
        return {"type": "function_call", "id": item_id, "call_id": block.call_id, "name": block.name,
                "arguments": block.text if done else "", "status": status}

    @staticmethod
    def part(block: Block, text: str | None = None) -> dict:
        return {"type": "output_text", "text": block.text if text is None else text, "annotations": [], "logprobs": []}

    def events(self, changes: list[Change]) -> list[dict]:
        out = []
        for c in changes:
            b = c.block
            ref = {"item_id": self.ids.get(b.index), "output_index": b.index}
            if c.what == "open":
                item = self.item(b, False)
                out.append({"type": "response.output_item.added", "output_index": b.index, "item": item})
                ref["item_id"] = item["id"]
                if b.kind == "text":
                    out.append({"type": "response.content_part.added", **ref, "content_index": 0, "part": self.part(b, "")})
            elif c.what == "delta":
                kind = {"reasoning": "response.reasoning_text.delta", "text": "response.output_text.delta",
                        "tool_call": "response.function_call_arguments.delta"}[b.kind]
                event = {"type": kind, **ref, "delta": c.text}
                if b.kind != "tool_call":
                    event["content_index"] = 0
                if b.kind == "text":
                    event["logprobs"] = []
                out.append(event)
            else:
                if b.kind == "reasoning":
                    out.append({"type": "response.reasoning_text.done", **ref, "content_index": 0, "text": b.text})
                elif b.kind == "text":
                    out.append({"type": "response.output_text.done", **ref, "content_index": 0, "text": b.text, "logprobs": []})
                    out.append({"type": "response.content_part.done", **ref, "content_index": 0, "part": self.part(b)})
                else:
                    out.append({"type": "response.function_call_arguments.done", **ref, "name": b.name, "arguments": b.text})
                out.append({"type": "response.output_item.done", "output_index": b.index, "item": self.item(b, True)})
        return out

    def output(self) -> list[dict]:
        return [self.item(b, True) for b in self.blocks.blocks]


def router(llm: LLM, config: ServerConfig, metrics: Metrics) -> APIRouter:
    api = APIRouter()
    store: OrderedDict[str, dict] = OrderedDict()  # response id -> {"items": input + output items, "response": body}
    tok = llm.processor.tokenizer

    def response_body(rid: str, body: ResponsesRequest, created: int, status: str, output: list[dict],
                      seq: Sequence | None) -> dict:
        usage = None
        if seq is not None and status != "in_progress":
            reasoning = "".join(b["content"][0]["text"] for b in output if b["type"] == "reasoning")
            usage = {
                "input_tokens": seq.num_prompt,
                "input_tokens_details": {"cached_tokens": seq.num_cached},
                "output_tokens": len(seq.output_ids),
                "output_tokens_details": {"reasoning_tokens": len(tok.encode(reasoning)) if reasoning else 0},
                "total_tokens": seq.num_prompt + len(seq.output_ids),
            }
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": rid, "object": "response", "created_at": created, "status": status, "model": body.model,
            "output": output, "error": None, "incomplete_details": incomplete, "instructions": body.instructions,
            "tools": body.tools or [], "tool_choice": body.tool_choice or "auto",
            "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
            "temperature": body.temperature, "top_p": body.top_p, "max_output_tokens": body.max_output_tokens,
            "previous_response_id": body.previous_response_id, "reasoning": body.reasoning or {"effort": None, "summary": None},
            "text": body.text or {"format": {"type": "text"}}, "truncation": body.truncation or "disabled",
            "store": body.store, "metadata": body.metadata or {}, "user": body.user, "usage": usage,
        }

    def status_of(seq: Sequence) -> str:
        return "incomplete" if seq.finish_reason == "length" else "completed"

    def keep(rid: str, items: list[dict], output: list[dict], body: dict, keep_it: bool) -> None:
        if not keep_it:
            return
        store[rid] = {"items": items + output, "response": body}
        while len(store) > STORE_SIZE:
            store.popitem(last=False)

    async def prepare(body: ResponsesRequest, lora: str | None) -> tuple[Sequence, list[dict]]:
        items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else list(body.input)
        if body.previous_response_id is not None:
            previous = store.get(body.previous_response_id)
            if previous is None:
                raise HTTPError(404, f"no stored response {body.previous_response_id!r} (responses are kept in memory, "
                                     f"the last {STORE_SIZE})", "not_found_error", "previous_response_id")
            items = previous["items"] + items
        messages = to_messages(items)
        if body.instructions is not None:  # not carried over from a previous response
            messages.insert(0, {"role": "system", "content": body.instructions})
        options = {"enable_thinking": body.thinking(), "tools": body.chat_tools(), "tool_choice": body.chat_tool_choice(),
                   "parallel_tool_calls": body.parallel_tool_calls, "lora": lora}
        seq = await prepare_chat(llm, config, messages, body.sampling_params(), options, body.mm_processor_kwargs,
                                 body.test_output)
        return seq, items

    @api.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        if response_id not in store:
            raise HTTPError(404, f"no stored response {response_id!r}", "not_found_error")
        return store[response_id]["response"]

    @api.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        metrics.requests += 1
        lora = adapter_for(llm, config, body.model)
        try:
            seq, items = await prepare(body, lora)
        except MiniCPMVError as exc:
            raise http_error(exc) from None
        rid, created = _id("resp"), int(time.time())
        if not body.stream:
            try:
                await until_disconnect(request, run_to_end(llm, seq, metrics))
            except MiniCPMVError as exc:
                raise http_error(exc) from None
            out = OutputItems()
            out.blocks.feed(seq.events)
            out.blocks.finish()
            result = response_body(rid, body, created, status_of(seq), out.output(), seq)
            keep(rid, items, result["output"], result, body.store)
            metrics.prompt_tokens += seq.num_prompt
            metrics.completion_tokens += len(seq.output_ids)
            return result

        outputs = generate(llm, seq)
        try:
            await anext(outputs)  # a refusal (queue full, too long) is a status code, not an event
        except MiniCPMVError as exc:
            raise http_error(exc) from None

        async def sse():
            number = 0

            def event(payload: dict) -> str:
                nonlocal number
                payload = {**payload, "sequence_number": number}
                number += 1
                return f"event: {payload['type']}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

            items_out = OutputItems()
            start = response_body(rid, body, created, "in_progress", [], None)
            yield event({"type": "response.created", "response": start})
            yield event({"type": "response.in_progress", "response": start})
            try:
                for e in items_out.events(items_out.blocks.feed(seq.prefix_events)):  # a forced call's start
                    yield event(e)
                async for out in outputs:
                    for e in items_out.events(items_out.blocks.feed(out.events)):
                        yield event(e)
                    if out.finished:
                        for e in items_out.events(items_out.blocks.finish()):
                            yield event(e)
                status = status_of(seq)
                final = response_body(rid, body, created, status, items_out.output(), seq)
                keep(rid, items, final["output"], final, body.store)
                metrics.prompt_tokens += seq.num_prompt
                metrics.completion_tokens += len(seq.output_ids)
                yield event({"type": f"response.{status}", "response": final})
            except Exception as exc:  # failed mid-stream: the status line is gone, so report it in the stream
                error = http_error(exc)
                metrics.error(error.status)
                if error.status >= 500:
                    log.exception("generation failed mid-stream")
                yield event({"type": "error", "code": error.kind, "message": error.message, "param": error.param})
            finally:
                await outputs.aclose()

        return StreamingResponse(sse(), media_type="text/event-stream")

    return api
