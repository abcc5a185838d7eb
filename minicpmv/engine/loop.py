"""The one thread that steps the engine. Any thread may submit a sequence, abort one, or wait for outputs.

Only the loop thread touches the ``Engine``. Submissions and aborts reach it through a queue; each sequence's
outputs go to the sink its submitter gave: ``sink(None)`` once the engine accepted it, then one ``StepOutput`` per
step that produced something (the last one ``finished``; with n > 1 choices, each choice's), or one exception (refused: queue full, too long; or the
step failed). The thread starts with the first submission and sleeps while there is no work.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from minicpmv.engine.engine import Engine, StepOutput
from minicpmv.engine.sequence import Sequence
from minicpmv.errors import EngineClosedError

log = logging.getLogger("minicpmv.engine")

Sink = Callable[[StepOutput | Exception | None], None]


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = threading.Event()

    def submit(self, seq: Sequence, sink: Sink) -> None:
        if self._closed.is_set():
            raise EngineClosedError("the engine was shut down")
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="minicpmv-engine", daemon=True)
                self._thread.start()
        self._inbox.put(("add", seq, sink))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; sequences still running are aborted."""
        self._closed.set()
        self._inbox.put(("wake", None, None))
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._closed.is_set():
            self._take_inbox(block=not self.engine.has_work())
            if self._closed.is_set() or not self.engine.has_work():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # never let one bad step end the loop: fail what was running
                log.exception("engine step failed")
                outputs = self.engine.fail_running(exc)
            for out in outputs:
                sink = self._sinks.get(out.seq.request_id)
                if sink is not None:
                    sink(out.error if out.error is not None else out)
                if out.finished:
                    self._sinks.pop(out.seq.request_id, None)
                    if out.error is not None:  # a failed prefill: its choices never start
                        for fork in out.seq.forks:
                            self._sinks.pop(fork.request_id, None)
        for request_id, sink in list(self._sinks.items()):
            self.engine.abort(request_id)
            sink(EngineClosedError("the engine was shut down before the request finished"))
        self._sinks.clear()
        while True:  # submitted but never taken in: refused the same way
            try:
                kind, _, sink = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                sink(EngineClosedError("the engine was shut down before the request started"))

    def _take_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, item, sink = self._inbox.get(block=block, timeout=1.0 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                try:
                    self.engine.add(item)
                except Exception as exc:  # refused (queue full, too long): tell the submitter
                    sink(exc)
                    continue
                for request_id in item.group_ids:  # n > 1: every choice's outputs go to the one sink
                    self._sinks[request_id] = sink
                sink(None)
            elif kind == "abort":
                seq = self.engine.abort(item)
                for request_id in seq.group_ids if seq is not None else [item]:
                    self._sinks.pop(request_id, None)
                self._sinks.pop(item, None)
