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
from minicpmv.errors import EngineClosedError, InvalidInputError, MiniCPMVError
from minicpmv.llm import LLM, ChatOptions, ChatResult, Usage
from minicpmv.output.events import ContentDelta, Event, ReasoningDelta, ToolCallArgsDelta, ToolCallStart
from minicpmv.serve.async_llm import generate, run_to_end, until_disconnect
from minicpmv.serve.config import ServerConfig
from minicpmv.serve.errors import HTTPError, http_error
from minicpmv.serve.logs import access
from minicpmv.serve.media import fetch_message_media
from minicpmv.serve.metrics import Metrics
from minicpmv.serve.openai_compat import check_messages
from minicpmv.serve.prepare import adapter_for
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


def choice_body(index: int, result: ChatResult, llm: LLM, legacy: bool = False) -> dict:
    message: dict = {"role": "assistant", "content": result.text}
    if result.reasoning is not None:
        message["reasoning_content"] = result.reasoning
    finish = result.finish_reason
    if result.tool_calls and legacy:  # the legacy API: one function_call, not tool_calls
        call = result.tool_calls[0]
        message["function_call"] = {"name": call.name, "arguments": call.arguments_json}
        finish = "function_call" if finish == "tool_calls" else finish
    elif result.tool_calls:
        message["tool_calls"] = [tool_call_body(c) for c in result.tool_calls]
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs_body(llm, result.logprobs) if result.logprobs is not None else None,
        "finish_reason": finish,
    }


def choices_usage(results: list[ChatResult]) -> Usage:
    """n choices: the prompt counted once, every choice's output counted."""
    first = results[0].usage
    return dataclasses.replace(first, completion_tokens=sum(r.usage.completion_tokens for r in results))


def completion(results: list[ChatResult], model: str, llm: LLM, body: ChatCompletionRequest, cid: str) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [choice_body(i, r, llm, body.legacy_functions) for i, r in enumerate(results)],
        "usage": usage_body(choices_usage(results)),
    }


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def prepend(first, rest: AsyncIterator):
    yield first
    async for item in rest:
        yield item


def event_delta(e: Event, legacy: bool = False) -> dict | None:
    """One parser event as an OpenAI chunk delta: text, reasoning, a tool call's name, then its argument pieces
    (``legacy``: as the old API's function_call)."""
    if isinstance(e, ContentDelta):
        return {"content": e.text}
    if isinstance(e, ReasoningDelta):
        return {"reasoning_content": e.text}
    if legacy and isinstance(e, ToolCallStart):
        return {"function_call": {"name": e.name, "arguments": ""}}
    if legacy and isinstance(e, ToolCallArgsDelta):
        return {"function_call": {"arguments": e.text}}
    if isinstance(e, ToolCallStart):
        fn = {"name": e.name, "arguments": ""}
        return {"tool_calls": [{"index": e.index, "id": e.id, "type": "function", "function": fn}]}
    if isinstance(e, ToolCallArgsDelta):
        return {"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]}
    return None  # ToolCallEnd: nothing to send


async def stream_chunks(llm: LLM, seq, body: ChatCompletionRequest, model: str, metrics, cid: str, arrived: float):
    """SSE strings. The first item is an HTTPError instead when the engine refuses the request."""
    created = now()
    outputs = generate(llm, seq)
    deltas_of = (lambda events: [d for d in (event_delta(e, body.legacy_functions) for e in events) if d is not None])
    status, first_token = 200, None

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
        for delta in deltas_of(seq.prefix_events):  # what the prompt gave the answer: a forced call's name
            yield chunk(delta, choice_index=i)
    last, finished = None, 0
    try:
        async for out in outputs:
            t = time.perf_counter()
            (metrics.ttft if last is None else metrics.inter_token).observe(t - (last or arrived))
            first_token = first_token or t
            last = t
            one, i = out.seq, index[out.seq.request_id]
            deltas = deltas_of(out.events)
            lp = None
            if one.params.logprobs is not None and out.token_ids:
                lp = logprobs_body(llm, one.logprobs[-len(out.token_ids):])
            for k, d in enumerate(deltas):
                yield chunk(d, logprobs=lp if k == 0 else None, choice_index=i)
            if not deltas and lp is not None:
                yield chunk({}, logprobs=lp, choice_index=i)
            if out.finished:
                finish = llm.result(one).finish_reason
                if body.legacy_functions and finish == "tool_calls":
                    finish = "function_call"
                yield chunk({}, finish_reason=finish, choice_index=i)
                finished += 1
            if finished == len(choices):
                total = choices_usage([llm.result(c) for c in choices])
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [], "usage": usage_body(total)})
    except Exception as exc:  # failed mid-stream: the status line is gone, so report it in the stream
        error = http_error(exc)
        status = error.status
        metrics.error(error.status)
        if error.status >= 500 and not isinstance(exc, EngineClosedError):
            log.exception("generation failed mid-stream")
        yield sse({"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.status}})
    finally:
        await outputs.aclose()  # a client that went away cancels its sequence here
        elapsed = time.perf_counter() - arrived
        if status == 200 and seq.finish_reason == "abort":  # the client went away
            status = 499
        if status == 200:
            metrics.done(200, seq.num_prompt, sum(len(c.output_ids) for c in choices), elapsed)
        access(cid, status, llm.usage(seq), first_token and first_token - arrived, elapsed, seq.finish_reason, "stream")
    yield sse("[DONE]")


def router(llm: LLM, config: ServerConfig, metrics: Metrics) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        metrics.requests += 1
        cid, arrived = completion_id(), time.perf_counter()
        lora = adapter_for(llm, config, body.model)
        try:
            seq = await prepare(body, lora)
        except MiniCPMVError as exc:
            raise http_error(exc) from None
        if body.stream:
            stream = stream_chunks(llm, seq, body, body.model, metrics, cid, arrived)
            first = await anext(stream)  # surface refusals (queue full, context) as a status code, not in the stream
            if isinstance(first, HTTPError):
                raise first
            return StreamingResponse(prepend(first, stream), media_type="text/event-stream")
        status, timing = 500, {}
        try:
            await until_disconnect(request, run_to_end(llm, seq, metrics, timing))
            status = 200
        except MiniCPMVError as exc:
            error = http_error(exc)
            status = error.status
            raise error from None
        except HTTPError as exc:
            status = exc.status
            raise
        finally:
            if seq.finish_reason is not None:  # it ran (a refusal before that is logged by the app's error handler)
                request.state.access_logged = True
                ttft = timing["first_token"] - arrived if "first_token" in timing else None
                access(cid, status, llm.usage(seq), ttft, time.perf_counter() - arrived, seq.finish_reason)
        results = [llm.result(s) for s in (seq, *seq.forks)]
        total = choices_usage(results)
        metrics.done(200, total.prompt_tokens, total.completion_tokens, time.perf_counter() - arrived)
        return completion(results, body.model, llm, body, cid)

    async def prepare(body: ChatCompletionRequest, lora: str | None) -> Sequence:
        messages = [await fetch_message_media(m, config.media) for m in check_messages(body.messages)]
        mm = {k: v for k, v in asdict(body.processing_options()).items() if v is not None}
        thinking = body.thinking(body.chat_template_kwargs.enable_thinking if body.chat_template_kwargs else None)
        tools, tool_choice = body.tool_fields(body.tools, body.tool_choice)
        options = ChatOptions.build(
            {**asdict(llm.default_options), **mm},
            {
                "enable_thinking": thinking,
                "tools": tools,
                "tool_choice": tool_choice,
                "parallel_tool_calls": False if body.legacy_functions else body.parallel_tool_calls,
                "normalize_escaped_newlines": body.normalize_escaped_newlines,
                "lora": lora,
            },
        )
        params = body.sampling_params()
        if params.max_tokens is None and config.default_max_tokens is not None:
            params.max_tokens = max(config.default_max_tokens, params.min_tokens)
        seq = await asyncio.to_thread(llm.prepare, messages, params, options)
        if body.test_output is not None:
            if not config.enable_test_hooks:
                raise InvalidInputError("test_output is only accepted by a server started with --enable-test-hooks")
            seq.forced_output_ids = llm.processor.tokenizer.encode(body.test_output)
        seq.forks = [seq.fork() for _ in range(body.n - 1)]
        return seq

    return api
