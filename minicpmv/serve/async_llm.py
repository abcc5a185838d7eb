"""The ``LLM``'s thread-safe submit / abort, seen from asyncio: each request's outputs arrive on its task's queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable

from fastapi import Request

from minicpmv.engine.engine import StepOutput
from minicpmv.engine.sequence import Sequence
from minicpmv.llm import LLM, ChatResult
from minicpmv.serve.errors import HTTPError
from minicpmv.serve.metrics import Metrics


async def generate(llm: LLM, seq: Sequence) -> AsyncIterator[StepOutput | None]:
    """Submit ``seq``; yield None once the engine accepted it, then its outputs. A refusal (queue full, too long)
    is raised before anything is yielded. Leaving early (a client that went away) aborts the sequence."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    llm.submit(seq, lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item))
    pending, finished = set(seq.group_ids), False  # n > 1: until every choice finished
    try:
        while not finished:
            item = await inbox.get()
            if isinstance(item, Exception):
                finished = True
                raise item
            if item is not None and item.finished:
                pending.discard(item.seq.request_id)
            finished = not pending
            yield item
    finally:
        if not finished:
            llm.abort(seq.request_id)


async def merge(streams: list[AsyncIterator]) -> AsyncIterator:
    """The items of several async iterators as they come (one request's several prompts)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream):
        try:
            async for item in stream:
                await queue.put(item)
        except Exception as exc:
            await queue.put(exc)
        await queue.put(done)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:  # a consumer that leaves early cancels the rest (their sequences are aborted)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_to_end(llm: LLM, seq: Sequence, metrics: Metrics, timing: dict | None = None) -> ChatResult:
    """Run ``seq`` to its end (timing its tokens for the metrics; ``timing["first_token"]`` gets the first one's
    perf_counter time) and return its result."""
    start, last = time.perf_counter(), None
    async for out in generate(llm, seq):
        if out is None:  # accepted
            continue
        t = time.perf_counter()
        (metrics.ttft if last is None else metrics.inter_token).observe(t - (last or start))
        if last is None and timing is not None:
            timing["first_token"] = t
        last = t
    return llm.result(seq)


async def until_disconnect(request: Request, work: Awaitable):
    """Await ``work``, cancelling it (and so its sequence) if the client goes away first."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait([task], timeout=0.1)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            raise HTTPError(499, "client closed the request")
    return task.result()
