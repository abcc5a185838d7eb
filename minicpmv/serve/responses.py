"""OpenAI response bodies: a whole chat.completion, or its stream of chat.completion.chunk SSE events."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from minicpmv.errors import MiniCPMVError
from minicpmv.llm import LLM, ChatOptions, ChatResult, Usage
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


def completion(result: ChatResult, model: str, llm: LLM, body: ChatCompletionRequest) -> dict:
    message: dict = {"role": "assistant", "content": result.text}
    if result.reasoning is not None:
        message["reasoning_content"] = result.reasoning
    if result.tool_calls:
        message["tool_calls"] = [tool_call_body(c) for c in result.tool_calls]
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": logprobs_body(llm, result.logprobs) if result.logprobs is not None else None,
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage_body(result.usage),
    }


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def prepend(first, rest: AsyncIterator):
    yield first
    async for item in rest:
        yield item


async def stream_chunks(llm: LLM, engine, seq, options: ChatOptions, body: ChatCompletionRequest, model: str, metrics):
    """SSE strings. The first item is an HTTPError instead when the engine refuses the request."""
    from minicpmv.serve.app import http_error, status_of

    cid, created = completion_id(), now()
    parser, history = llm.stream_parser(seq, options)
    unsent = list(history)  # the forced prefix's events go out with the first output
    held: dict[int, list[dict]] = {}  # tool-call deltas wait for their call to complete: a void call never shows
    generate = engine.generate(seq)

    def chunk(delta: dict, finish_reason=None, logprobs=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]})

    try:
        await anext(generate)  # accepted by the engine
    except MiniCPMVError as exc:
        yield http_error(exc)
        return
    yield chunk({"role": "assistant", "content": ""})
    start, last = time.perf_counter(), None
    try:
        async for out in generate:
            t = time.perf_counter()
            (metrics.ttft if last is None else metrics.inter_token).observe(t - (last or start))
            last = t
            step = llm.delta(seq, out, parser, options, history, unsent)
            unsent = []
            deltas = []
            for e in step.events:
                if e.kind == "content":
                    deltas.append({"content": e.text})
                elif e.kind == "reasoning":
                    deltas.append({"reasoning_content": e.text})
                elif e.kind == "tool_call_start":
                    fn = {"name": e.name, "arguments": ""}
                    held[e.index] = [{"tool_calls": [{"index": e.index, "id": e.id, "type": "function", "function": fn}]}]
                elif e.kind == "tool_call_args":
                    held[e.index].append({"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})
                elif e.kind == "tool_call_end":
                    deltas += held.pop(e.index)
                elif e.kind == "tool_call_abort":
                    held.pop(e.index, None)
            lp = None
            if seq.params.logprobs is not None and out.token_ids:
                lp = logprobs_body(llm, seq.logprobs[-len(out.token_ids):])
            for i, d in enumerate(deltas):
                yield chunk(d, logprobs=lp if i == 0 else None)
            if not deltas and lp is not None:
                yield chunk({}, logprobs=lp)
            if out.finished:
                result = step.result
                metrics.prompt_tokens += result.usage.prompt_tokens
                metrics.completion_tokens += result.usage.completion_tokens
                yield chunk({}, finish_reason=result.finish_reason)
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [], "usage": usage_body(result.usage)})
    except Exception as exc:  # failed mid-stream: the status line is gone, so report it in the stream
        status, kind = status_of(exc)
        metrics.error(status)
        if status >= 500:
            log.exception("generation failed mid-stream")
        message = str(exc) if status < 500 else f"internal error ({type(exc).__name__})"
        yield sse({"error": {"message": message, "type": kind, "code": status}})
    finally:
        await generate.aclose()  # a client that went away cancels its sequence here
    yield sse("[DONE]")
