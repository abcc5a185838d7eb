"""Graceful shutdown: the first SIGTERM / SIGINT stops new work (503) and gives in-flight requests up to
``shutdown_timeout`` seconds; then, or at a second signal, the engine ends what is left (a stream gets an error event
and ``[DONE]``, a whole answer a 503) and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time

import uvicorn

from minicpmv.serve.protocol import error_body

log = logging.getLogger("minicpmv.serve")

FLUSH_SECONDS = 3.0  # after the engine ended the requests: time for their last bytes to go out


class Drain:
    """What the server knows about its requests for shutting down: how many are in flight, and whether to refuse."""

    def __init__(self):
        self.draining = False
        self.inflight = 0


class Lifecycle:
    """ASGI middleware that counts in-flight HTTP requests and, once draining, answers new ones with a 503."""

    def __init__(self, app, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.drain.draining:
            body = json.dumps(error_body("the server is shutting down", "service_unavailable", 503)).encode()
            headers = [(b"content-type", b"application/json"), (b"retry-after", b"1"), (b"connection", b"close")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        self.drain.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.inflight -= 1


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose signals drain instead of exiting at once, and which never re-raises them (exit 0)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, end_requests, shutdown_timeout: float = 10.0):
        """``end_requests()`` (blocking, run on a worker thread) ends every request the engine still holds."""
        super().__init__(config)
        self.drain, self.end_requests, self.shutdown_timeout = drain, end_requests, shutdown_timeout
        self.drain_deadline: float | None = None
        self.flush_deadline: float | None = None
        self.forced = False
        self.signals: list[str] = []
        self._ending: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:
        # Only note it (a signal handler must not take locks, logging's included); on_tick acts on it. No super():
        # uvicorn would re-raise the signal after shutting down, and the process would die by it.
        self.signals.append(signal.Signals(sig).name)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if not self.signals:
            return False
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.shutdown_timeout
            self.drain.draining = True
            log.warning("%s: shutting down; %d request(s) in flight get up to %g s (signal again to stop now)",
                        self.signals[0], self.drain.inflight, self.shutdown_timeout)
        if len(self.signals) > 1 and not self.forced:
            self.forced = True
            log.warning("%s again: ending the requests in flight now", self.signals[-1])
        if self.drain.inflight == 0:
            return True
        if self._ending is None and (self.forced or time.monotonic() >= self.drain_deadline):
            log.warning("ending %d request(s) still in flight", self.drain.inflight)
            self._ending = asyncio.ensure_future(asyncio.to_thread(self.end_requests))
            self.flush_deadline = time.monotonic() + FLUSH_SECONDS
        if self.flush_deadline is not None and time.monotonic() >= self.flush_deadline:
            self.force_exit = True  # the last responses had their chance: do not wait on connections
            return True
        return False

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        if self._ending is not None:
            await self._ending
