"""Runs the engine on one background thread and hands each request's outputs to its asyncio task.

Only the loop thread touches the engine. Requests and cancellations reach it through a queue; outputs go back
with ``call_soon_threadsafe``. A cancelled task (a client that disconnected) aborts its sequence.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable

from minicpmv.engine.engine import Engine, StepOutput
from minicpmv.engine.sequence import Sequence


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Callable[[object], None]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="minicpmv-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None, None))
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            block = not self.engine.has_work()
            while True:
                try:
                    kind, seq, sink = self._inbox.get(block=block, timeout=0.5 if block else None)
                except queue.Empty:
                    break
                block = False
                if kind == "add":
                    try:
                        self.engine.add(seq)
                        self._sinks[seq.request_id] = sink
                        sink(None)  # accepted
                    except Exception as exc:  # refused (queue full, too long): tell the caller
                        sink(exc)
                elif kind == "abort":
                    self.engine.abort(seq)
                    self._sinks.pop(seq, None)
            if not self.engine.has_work():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # never let one bad step kill the server: fail what is running
                for s in list(self.engine.scheduler.running):
                    self.engine.abort(s.request_id)
                    sink = self._sinks.pop(s.request_id, None)
                    if sink:
                        sink(exc)
                continue
            for out in outputs:
                sink = self._sinks.get(out.seq.request_id)
                if sink is None:
                    continue
                sink(out.error if out.error is not None else out)
                if out.finished:
                    self._sinks.pop(out.seq.request_id, None)

    async def generate(self, seq: Sequence) -> AsyncIterator[StepOutput]:
        """Submit ``seq``; yield None once the engine accepted it, then its outputs. Leaving early cancels it;
        a refusal (queue full, too long) is raised before anything is yielded."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def sink(item: object) -> None:
            loop.call_soon_threadsafe(inbox.put_nowait, item)

        self._inbox.put(("add", seq, sink))
        finished = False
        try:
            while True:
                item = await inbox.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                yield item
                if item is not None and item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._inbox.put(("abort", seq.request_id, None))
