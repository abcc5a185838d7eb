"""Ollama's API: /api/chat and /api/generate (NDJSON streams, on by default as in Ollama), /api/tags, /api/show,
/api/ps, /api/version. Errors are Ollama's ``{"error": "..."}`` bodies (see ``error_body``; app.py uses it for /api/).

Extras beyond Ollama: ``videos`` (base64) on messages and on generate, and our processing options
(downsample_mode, max_slice_nums, ...) inside ``options``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from minicpmv.engine.sampling import SamplingParams, StructuredOutputs
from minicpmv.engine.sequence import Sequence
from minicpmv.errors import InvalidInputError, MiniCPMVError
from minicpmv.llm import LLM
from minicpmv.output.events import ContentDelta, ReasoningDelta, collect_tool_calls, new_call_id
from minicpmv.processing.options import ProcessingOptions
from minicpmv.serve.async_llm import generate, run_to_end, until_disconnect
from minicpmv.serve.config import ServerConfig
from minicpmv.serve.errors import HTTPError, http_error
from minicpmv.serve.metrics import Metrics
from minicpmv.serve.prepare import adapter_for, json_output, prepare_chat

log = logging.getLogger("minicpmv.serve")

OLLAMA_VERSION = "0.12.0"  # the Ollama API version these routes follow (clients gate features on it)
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
            "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty", "stop": "stop"}
# llama.cpp runtime knobs that do not change the output here: accepted and unused
RUNTIME = {"numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "use_mmap", "use_mlock", "num_thread", "num_keep",
           "vocab_only", "f16_kv", "logits_all", "embedding_only"}
# sampling options we do not implement: accepted only at their "off" values
UNSUPPORTED = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0, "penalize_newline": False, "repeat_last_n": 64}
PROCESSING = {f.name for f in dataclasses.fields(ProcessingOptions)}


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict:
    return {"error": f"{param}: {message}" if param and param not in message else message}


class _Body(BaseModel):
    """What /api/chat and /api/generate share."""

    model_config = ConfigDict(extra="forbid")
    model: str
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: float | str | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    test_output: str | None = None

    def hook(self) -> str | None:
        return self.test_output if self.test_output is not None else (self.options or {}).get("test_output")


class ChatBody(_Body):
    messages: list[dict[str, Any]] = []
    tools: list[dict[str, Any]] | None = None


class GenerateBody(_Body):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    images: list[str] | None = None
    videos: list[str] | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _decode(data: Any, kind: str, where: str, limit: int) -> bytes:
    if isinstance(data, str) and data.startswith("data:"):
        data = data.partition(",")[2]
    if not isinstance(data, str):
        raise InvalidInputError(f"{where}: {kind}s are base64 strings", param=where)
    if len(data) // 4 * 3 > limit + 3:
        raise InvalidInputError(f"{where}: the {kind} is larger than {limit} bytes", param=where)
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInputError(f"{where}: invalid base64 ({exc})", param=where) from None
    if not raw:
        raise InvalidInputError(f"{where}: the {kind} is empty", param=where)
    return raw


def media_parts(message: dict, config: ServerConfig, where: str) -> list[dict]:
    parts = []
    for kind in ("image", "video"):
        items = message.get(f"{kind}s") or []
        if not isinstance(items, list):
            raise InvalidInputError(f"{where}.{kind}s must be a list of base64 strings", param=f"{where}.{kind}s")
        limit = config.media.limit_for(kind)
        parts += [{"type": kind, kind: _decode(d, kind, f"{where}.{kind}s.{i}", limit)} for i, d in enumerate(items)]
    return parts


def to_messages(messages: list[dict], config: ServerConfig) -> list[dict]:
    """Ollama messages (images as base64, tool calls with argument objects) as chat messages."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise InvalidInputError(f"{where}: a message needs a role of system, user, assistant or tool", param=f"{where}.role")
        unknown = set(m) - {"role", "content", "images", "videos", "thinking", "tool_calls", "tool_name"}
        if unknown:
            raise InvalidInputError(f"{where}: unknown message field(s) {sorted(unknown)}", param=f"{where}.{sorted(unknown)[0]}")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise InvalidInputError(f"{where}.content must be a string", param=f"{where}.content")
        msg: dict[str, Any] = {"role": m["role"]}
        media = media_parts(m, config, where)
        msg["content"] = [*media, {"type": "text", "text": content}] if media else content
        if m.get("thinking"):
            msg["reasoning_content"] = m["thinking"]
        if m.get("tool_calls"):
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise InvalidInputError(f"{where}.tool_calls.{j}: needs function.name", param=f"{where}.tool_calls.{j}")
                args = fn.get("arguments", {})
                calls.append({"id": new_call_id(), "type": "function",
                              "function": {"name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}})
            msg["tool_calls"] = calls
        if m.get("tool_name"):
            msg["name"] = m["tool_name"]
        out.append(msg)
    return out


def split_options(options: dict | None, where: str = "options") -> tuple[dict, dict, int | None, int | None]:
    """Ollama options -> (SamplingParams fields, processing options, num_predict, num_ctx)."""
    sampling, processing, num_predict, num_ctx = {}, {}, None, None
    for key, value in (options or {}).items():
        if key == "test_output":  # the test hook (see router): options is where the ollama client lets it through
            continue
        if key in SAMPLING:
            sampling[SAMPLING[key]] = value
        elif key in PROCESSING:
            processing[key] = value
        elif key == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value not in (-1, -2)):
                raise InvalidInputError(f"{where}.num_predict must be an integer >= 1, or -1 / -2", param=f"{where}.num_predict")
            num_predict = value if value > 0 else None
        elif key == "num_ctx":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInputError(f"{where}.num_ctx must be an integer >= 1", param=f"{where}.num_ctx")
            num_ctx = value
        elif key in RUNTIME:
            continue
        elif key in UNSUPPORTED:
            if value != UNSUPPORTED[key]:
                raise InvalidInputError(f"{where}.{key} is not supported (only {UNSUPPORTED[key]!r})", param=f"{where}.{key}")
        else:
            raise InvalidInputError(f"unknown option {key!r}", param=f"{where}.{key}")
    return sampling, processing, num_predict, num_ctx


def thinking(think) -> bool:
    if think is None or isinstance(think, bool):
        return bool(think)
    if think in ("low", "medium", "high"):
        return True
    raise InvalidInputError(f"think must be true, false, 'low', 'medium' or 'high', got {think!r}", param="think")


def output_format(fmt) -> StructuredOutputs | None:
    """Ollama's ``format``: "json" (any JSON object) or a JSON schema."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return json_output("format")
    if isinstance(fmt, dict):
        return json_output("format", fmt)
    raise InvalidInputError(f"format must be 'json' or a JSON schema, got {fmt!r}", param="format")


def router(llm: LLM, config: ServerConfig, metrics: Metrics) -> APIRouter:
    api = APIRouter()
    started = _now()
    details = {"parent_model": "", "format": "safetensors", "family": "minicpmv", "families": ["minicpmv", "qwen35"],
               "parameter_size": "1.3B", "quantization_level": getattr(llm.model, "quantization", None) or llm.dtype}
    size = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    digest = hashlib.sha256(llm.name.encode()).hexdigest()  # stands for the checkpoint in Ollama's listings

    def check_model(name: str) -> str | None:
        """The LoRA adapter ``name`` stands for (None: the base model)."""
        try:
            return adapter_for(llm, config, name, ":latest")
        except HTTPError:
            raise HTTPError(404, f"model '{name}' not found", "not_found_error", "model") from None

    def model_entry(name: str | None = None) -> dict:
        """The base model's entry, or a LoRA adapter's (``name``) with the base as its parent."""
        if name is None:
            return {"name": config.model_name, "model": config.model_name, "modified_at": started, "size": size,
                    "digest": digest, "details": details}
        return {"name": name, "model": name, "modified_at": started, "size": size,
                "digest": hashlib.sha256(f"{llm.name}+{name}".encode()).hexdigest(),
                "details": {**details, "parent_model": config.model_name}}

    def model_entries() -> list[dict]:
        return [model_entry(), *(model_entry(n) for n in llm.lora.names())]

    @api.get("/api/version")
    async def version():
        return {"version": OLLAMA_VERSION}

    @api.get("/api/tags")
    async def tags():
        return {"models": model_entries()}

    @api.get("/api/ps")
    async def ps():
        return {"models": [{**entry, "expires_at": "2318-01-01T00:00:00Z", "size_vram": 0,
                            "context_length": llm.engine.max_model_len} for entry in model_entries()]}

    @api.post("/api/show")
    async def show(body: dict[str, Any]):
        name = body.get("model") or body.get("name")
        if not isinstance(name, str):
            raise HTTPError(400, "model is required", param="model")
        check_model(name)
        return {
            "modelfile": f"FROM {llm.name}\n", "parameters": "", "template": "{{ .Messages }} (the model's chat template)",
            "details": details, "modified_at": started,
            "model_info": {"general.architecture": "minicpmv", "minicpmv.context_length": llm.engine.max_model_len},
            "capabilities": ["completion", "vision", "tools", "thinking"],
        }

    def params_for(options: dict | None, fmt) -> tuple[SamplingParams, dict, int | None]:
        sampling, processing, num_predict, num_ctx = split_options(options)
        if num_predict is not None:
            sampling["max_tokens"] = num_predict
        return SamplingParams(**sampling, structured=output_format(fmt)), processing, num_ctx

    def fit_context(seq: Sequence, num_ctx: int | None) -> None:
        """num_ctx: the prompt and the answer must fit this many tokens (Ollama's per-request window)."""
        if num_ctx is None:
            return
        if seq.num_prompt >= num_ctx:
            raise InvalidInputError(f"the prompt has {seq.num_prompt} tokens, num_ctx is {num_ctx}", param="options.num_ctx")
        room = num_ctx - seq.num_prompt
        seq.params = dataclasses.replace(seq.params, max_tokens=min(seq.params.max_tokens or room, room))

    def stats(seq: Sequence, t0: float, t_first: float | None) -> dict:
        t_end = time.perf_counter()
        first = t_first or t_end
        return {"total_duration": int((t_end - t0) * 1e9), "load_duration": 0, "prompt_eval_count": seq.num_prompt,
                "prompt_eval_duration": int((first - t0) * 1e9), "eval_count": len(seq.output_ids),
                "eval_duration": int((t_end - first) * 1e9)}

    def done_reason(seq: Sequence) -> str:
        return "length" if seq.finish_reason == "length" else "stop"

    def calls_body(calls) -> list[dict]:
        return [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]

    async def run(seq: Sequence, request: Request, stream: bool, shape, model: str):
        """Non-streamed: one body; streamed: NDJSON lines. ``shape(events, final)`` makes one body's payload."""
        t0 = time.perf_counter()
        if not stream:
            try:
                await until_disconnect(request, run_to_end(llm, seq, metrics))
            except MiniCPMVError as exc:
                raise http_error(exc) from None
            metrics.prompt_tokens += seq.num_prompt
            metrics.completion_tokens += len(seq.output_ids)
            return {"model": model, "created_at": _now(), **shape(seq.events, True), "done": True,
                    "done_reason": done_reason(seq), **stats(seq, t0, None)}
        outputs = generate(llm, seq)
        try:
            await anext(outputs)
        except MiniCPMVError as exc:
            raise http_error(exc) from None

        async def lines():
            first = None
            try:
                if seq.prefix_events:
                    yield json.dumps({"model": model, "created_at": _now(), **shape(seq.prefix_events, False),
                                      "done": False}) + "\n"
                async for out in outputs:
                    first = first or time.perf_counter()
                    if out.events:
                        yield json.dumps({"model": model, "created_at": _now(), **shape(out.events, False),
                                          "done": False}, ensure_ascii=False) + "\n"
                metrics.prompt_tokens += seq.num_prompt
                metrics.completion_tokens += len(seq.output_ids)
                yield json.dumps({"model": model, "created_at": _now(), **shape([], False), "done": True,
                                  "done_reason": done_reason(seq), **stats(seq, t0, first)}) + "\n"
            except Exception as exc:  # failed mid-stream: Ollama reports it as an error line
                error = http_error(exc)
                metrics.error(error.status)
                if error.status >= 500:
                    log.exception("generation failed mid-stream")
                yield json.dumps({"error": error.message}) + "\n"
            finally:
                await outputs.aclose()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    def text_of(events, kind) -> str:
        return "".join(e.text for e in events if isinstance(e, kind))

    @api.post("/api/chat")
    async def chat(body: ChatBody, request: Request):
        metrics.requests += 1
        lora = check_model(body.model)
        if not body.messages:  # Ollama: an empty chat loads the model and answers at once
            return {"model": body.model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                    "done": True, "done_reason": "load"}
        try:
            params, processing, num_ctx = params_for(body.options, body.format)
            seq = await prepare_chat(llm, config, to_messages(body.messages, config), params,
                                     {"enable_thinking": thinking(body.think), "tools": body.tools, "lora": lora}, processing,
                                     body.hook(), where="options")
            fit_context(seq, num_ctx)
        except MiniCPMVError as exc:
            raise http_error(exc) from None
        calls_sent: set[str] = set()

        def shape(events, final: bool) -> dict:
            message: dict[str, Any] = {"role": "assistant", "content": text_of(events, ContentDelta)}
            reasoning = text_of(events, ReasoningDelta)
            if reasoning:
                message["thinking"] = reasoning
            # a tool call goes out whole, once it is complete (arguments as an object)
            calls = [c for c in collect_tool_calls(seq.events) if c.id not in calls_sent]
            if calls:
                calls_sent.update(c.id for c in calls)
                message["tool_calls"] = calls_body(calls)
            return {"message": message}

        return await run(seq, request, body.stream, shape, body.model)

    @api.post("/api/generate")
    async def generate_route(body: GenerateBody, request: Request):
        metrics.requests += 1
        lora = check_model(body.model)
        try:
            for name in ("suffix", "template", "context"):
                if getattr(body, name):
                    raise InvalidInputError(f"{name} is not supported", param=name)
            params, processing, num_ctx = params_for(body.options, body.format)
            if body.prompt is None or body.prompt == "":
                return {"model": body.model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
            if body.raw:
                if body.images or body.videos or body.system or processing:
                    raise InvalidInputError("raw prompts take no images, videos, system or processing options", param="raw")
                seq = llm.prepare_ids(llm.processor.tokenizer.encode(body.prompt), params, lora)
                if body.hook() is not None:
                    if not config.enable_test_hooks:
                        raise InvalidInputError("test_output is only accepted by a server started with --enable-test-hooks")
                    seq.forced_output_ids = llm.processor.tokenizer.encode(body.hook())
            else:
                media = media_parts({"images": body.images, "videos": body.videos}, config, "generate")
                messages = [{"role": "system", "content": body.system}] if body.system else []
                messages.append({"role": "user", "content": [*media, {"type": "text", "text": body.prompt}] if media else body.prompt})
                seq = await prepare_chat(llm, config, messages, params, {"enable_thinking": thinking(body.think), "lora": lora},
                                         processing, body.hook(), where="options")
            fit_context(seq, num_ctx)
        except MiniCPMVError as exc:
            raise http_error(exc) from None

        def shape(events, final: bool) -> dict:
            out = {"response": text_of(events, ContentDelta)}
            reasoning = text_of(events, ReasoningDelta)
            if reasoning:
                out["thinking"] = reasoning
            return out

        return await run(seq, request, body.stream, shape, body.model)

    return api
