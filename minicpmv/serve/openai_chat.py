"""OpenAI chat completions: POST /v1/chat/completions -> one Sequence; its result as a chat.completion, or its
parser events as a stream of chat.completion.chunk SSE events."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from minicpmv.engine.sequence import Sequence
from minicpmv.errors import InvalidInputError, MiniCPMVError
from minicpmv.llm import LLM, ChatOptions, ChatResult, Usage
from minicpmv.output.events import ContentDelta, Event, ReasoningDelta, ToolCallArgsDelta, ToolCallStart
from minicpmv.serve.async_llm import generate, run_to_end, until_disconnect
from minicpmv.serve.config import ServerConfig
from minicpmv.serve.errors import HTTPError, http_error
from minicpmv.serve.media import fetch_message_media
from minicpmv.serve.metrics import Metrics
from minicpmv.serve.protocol import ChatCompletionRequest, completion_id, now

log = logging.getLogger("minicpmv.serve")


def usage_body(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cached_tokens,
            "image_tokens": usage.image_tokens,
            "video_tokens": usage.video_tokens,
        },
    }


def logprobs_body(llm: LLM, entries) -> dict:
    tok = llm.processor.tokenizer

    def item(token_id: int, logprob: float) -> dict:
        text = tok.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for e in entries:
        content.append({**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in zip(e.top_ids, e.top_logprobs)]})
    return {"content": content}


def tool_call_body(call) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}


def choice_body(index: int, result: ChatResult, llm: LLM) -> dict:
    message: dict = {"role": "assistant", "content": result.text}
    if result.reasoning is not None:
        message["reasoning_content"] = result.reasoning
    if result.tool_calls:
        message["tool_calls"] = [tool_call_body(c) for c in result.tool_calls]
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs_body(llm, result.logprobs) if result.logprobs is not None else None,
        "finish_reason": result.finish_reason,
    }


def choices_usage(results: list[ChatResult]) -> Usage:
    """n choices: the prompt counted once, every choice's output counted."""
    first = results[0].usage
    return dataclasses.replace(first, completion_tokens=sum(r.usage.completion_tokens for r in results))


def completion(results: list[ChatResult], model: str, llm: LLM, body: ChatCompletionRequest) -> dict:
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [choice_body(i, r, llm) for i, r in enumerate(results)],
        "usage": usage_body(choices_usage(results)),
    }


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def prepend(first, rest: AsyncIterator):
    yield first
    async for item in rest:
        yield item


def event_delta(e: Event) -> dict | None:
    """One parser event as an OpenAI chunk delta: text, reasoning, a tool call's name, then its argument pieces."""
    if isinstance(e, ContentDelta):
        return {"content": e.text}
    if isinstance(e, ReasoningDelta):
        return {"reasoning_content": e.text}
    if isinstance(e, ToolCallStart):
        fn = {"name": e.name, "arguments": ""}
        return {"tool_calls": [{"index": e.index, "id": e.id, "type": "function", "function": fn}]}
    if isinstance(e, ToolCallArgsDelta):
        return {"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]}
    return None  # ToolCallEnd: nothing to send


async def stream_chunks(llm: LLM, seq, body: ChatCompletionRequest, model: str, metrics):
    """SSE strings. The first item is an HTTPError instead when the engine refuses the request."""
    cid, created = completion_id(), now()
    outputs = generate(llm, seq)

    choices = [seq, *seq.forks]  # n > 1: chunks name their choice by index
    index = {s.request_id: i for i, s in enumerate(choices)}

    def chunk(delta: dict, finish_reason=None, logprobs=None, choice_index: int = 0) -> str:
        choice = {"index": choice_index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]})

    try:
        await anext(outputs)  # accepted by the engine
    except MiniCPMVError as exc:
        yield http_error(exc)
        return
    for i in range(len(choices)):
        yield chunk({"role": "assistant", "content": ""}, choice_index=i)
        for delta in filter(None, map(event_delta, seq.events)):  # what the prompt gave the answer: a forced call's name
            yield chunk(delta, choice_index=i)
    start, last, finished = time.perf_counter(), None, 0
    try:
        async for out in outputs:
            t = time.perf_counter()
            (metrics.ttft if last is None else metrics.inter_token).observe(t - (last or start))
            last = t
            one, i = out.seq, index[out.seq.request_id]
            deltas = [d for d in map(event_delta, out.events) if d is not None]
            lp = None
            if one.params.logprobs is not None and out.token_ids:
                lp = logprobs_body(llm, one.logprobs[-len(out.token_ids):])
            for k, d in enumerate(deltas):
                yield chunk(d, logprobs=lp if k == 0 else None, choice_index=i)
            if not deltas and lp is not None:
                yield chunk({}, logprobs=lp, choice_index=i)
            if out.finished:
                yield chunk({}, finish_reason=llm.result(one).finish_reason, choice_index=i)
                finished += 1
            if finished == len(choices):
                total = choices_usage([llm.result(c) for c in choices])
                metrics.prompt_tokens += total.prompt_tokens
                metrics.completion_tokens += total.completion_tokens
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [], "usage": usage_body(total)})
    except Exception as exc:  # failed mid-stream: the status line is gone, so report it in the stream
        error = http_error(exc)
        metrics.error(error.status)
        if error.status >= 500:
            log.exception("generation failed mid-stream")
        yield sse({"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.status}})
    finally:
        await outputs.aclose()  # a client that went away cancels its sequence here
    yield sse("[DONE]")


def router(llm: LLM, config: ServerConfig, metrics: Metrics) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        metrics.requests += 1
        if body.model != config.model_name and body.model not in llm.lora.names():  # the base or a LoRA adapter
            served = [config.model_name, *llm.lora.names()]
            raise HTTPError(404, f"model {body.model!r} does not exist; this server serves {served}", "not_found_error", "model")
        try:
            seq = await prepare(body)
        except MiniCPMVError as exc:
            raise http_error(exc) from None
        if body.stream:
            stream = stream_chunks(llm, seq, body, body.model, metrics)
            first = await anext(stream)  # surface refusals (queue full, context) as a status code, not in the stream
            if isinstance(first, HTTPError):
                raise first
            return StreamingResponse(prepend(first, stream), media_type="text/event-stream")
        try:
            await until_disconnect(request, run_to_end(llm, seq, metrics))
        except MiniCPMVError as exc:
            raise http_error(exc) from None
        results = [llm.result(s) for s in (seq, *seq.forks)]
        total = choices_usage(results)
        metrics.prompt_tokens += total.prompt_tokens
        metrics.completion_tokens += total.completion_tokens
        return completion(results, body.model, llm, body)

    async def prepare(body: ChatCompletionRequest) -> Sequence:
        messages = [await fetch_message_media(m, config.media) for m in body.messages]
        mm = {k: v for k, v in asdict(body.processing_options()).items() if v is not None}
        thinking = body.chat_template_kwargs.enable_thinking if body.chat_template_kwargs else False
        options = ChatOptions.build(
            {**asdict(llm.default_options), **mm},
            {
                "enable_thinking": thinking,
                "tools": body.tools,
                "tool_choice": body.tool_choice,
                "parallel_tool_calls": body.parallel_tool_calls,
                "normalize_escaped_newlines": body.normalize_escaped_newlines,
                "lora": None if body.model == config.model_name else body.model,  # a LoRA adapter's name
            },
        )
        params = body.sampling_params()
        seq = await asyncio.to_thread(llm.prepare, messages, params, options)
        if body.test_output is not None:
            if not config.enable_test_hooks:
                raise InvalidInputError("test_output is only accepted by a server started with --enable-test-hooks")
            seq.forced_output_ids = llm.processor.tokenizer.encode(body.test_output)
        seq.forks = [seq.fork() for _ in range(body.n - 1)]
        return seq

    return api
