"""The OpenAI-compatible HTTP server: /v1/chat/completions (streaming and not), /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minicpmv.engine.sequence import Sequence
from minicpmv.errors import InvalidInputError, MiniCPMVError, QueueFullError
from minicpmv.llm import LLM, ChatOptions, ChatResult
from minicpmv.processing.prompt import media_part
from minicpmv.serve import responses
from minicpmv.serve.async_engine import AsyncEngine
from minicpmv.serve.media import MediaPolicy, fetch_media_async
from minicpmv.serve.metrics import Metrics
from minicpmv.serve.protocol import ChatCompletionRequest, error_body

log = logging.getLogger("minicpmv.serve")


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 100 << 20
    media: MediaPolicy = field(default_factory=MediaPolicy)
    enable_test_hooks: bool = False


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def status_of(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, QueueFullError):
        return 429, "rate_limit_error"
    if isinstance(exc, (InvalidInputError, ValueError)):
        return 400, "invalid_request_error"
    return 500, "internal_error"


def http_error(exc: MiniCPMVError) -> HTTPError:
    """Our exception as the HTTP error it means, with the request field at fault when there is one."""
    status, kind = status_of(exc)
    return HTTPError(status, str(exc), kind, getattr(exc, "param", None))


class BodyLimit:
    """ASGI middleware: 413 for request bodies over the limit, whether or not Content-Length is honest."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # (the app's handler turns it into the JSON error; FastAPI's body parser
                raise StarletteHTTPException(413, f"request body exceeds {self.max_bytes} bytes")  # lets it through)
            return message

        await self.app(scope, limited, send)

    async def _reject(self, send):
        body = json.dumps(error_body(f"request body exceeds {self.max_bytes} bytes", "invalid_request_error", 413))
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body.encode()})


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    engine = AsyncEngine(llm.engine)
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        engine.shutdown()

    app = FastAPI(title="minicpmv", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.llm = engine, metrics, llm
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
        metrics.error(status)
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return JSONResponse(error_body(message, kind, status, param), status_code=status, headers=headers)

    @app.exception_handler(HTTPError)
    async def _http_error(_, exc: HTTPError):
        return error_response(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                  "invalid_request_error")
        if first.get("loc") == ("body",) and "json" not in request.headers.get("content-type", ""):
            return error_response(400, "send the request as JSON (Content-Type: application/json)", "invalid_request_error")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return error_response(400, message, "invalid_request_error", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(_, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(_, exc: Exception):
        log.exception("unexpected error")
        return error_response(500, f"internal error ({type(exc).__name__})", "internal_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1/"):
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(key.encode(), config.api_key.encode()):
                return error_response(401, "missing or wrong API key", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(llm.engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created, "owned_by": "minicpmv"}]}

    web = Path(__file__).with_name("web") / "index.html"
    page = web.read_text() if web.is_file() else None

    @app.get("/", response_class=HTMLResponse)
    async def index():
        if page is None:
            raise HTTPError(404, "the web chat page is not installed")
        return HTMLResponse(page)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        metrics.requests += 1
        if body.model != config.model_name:
            raise HTTPError(404, f"model {body.model!r} does not exist; this server serves {config.model_name!r}", "not_found_error", "model")
        try:
            seq, options = await prepare(body)
        except MiniCPMVError as exc:
            raise http_error(exc) from None
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        if body.stream:
            stream = responses.stream_chunks(llm, engine, seq, options, body, config.model_name, metrics)
            first = await anext(stream)  # surface refusals (queue full, context) as a status code, not in the stream
            if isinstance(first, HTTPError):
                raise first
            return StreamingResponse(responses.prepend(first, stream), media_type="text/event-stream")
        try:
            result = await until_disconnect(request, run_to_end(seq, options))
        except MiniCPMVError as exc:
            raise http_error(exc) from None
        metrics.prompt_tokens += result.usage.prompt_tokens
        metrics.completion_tokens += result.usage.completion_tokens
        return responses.completion(result, config.model_name, llm, body)

    async def until_disconnect(request: Request, work):
        """Await ``work``, cancelling it (and so its sequence) if the client goes away first."""
        task = asyncio.ensure_future(work)
        while not task.done():
            await asyncio.wait([task], timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise HTTPError(499, "client closed the request")
        return task.result()

    async def run_to_end(seq: Sequence, options: ChatOptions) -> ChatResult:
        start, last = time.perf_counter(), None
        async for out in engine.generate(seq):
            if out is None:  # accepted
                continue
            t = time.perf_counter()
            if last is None:
                metrics.ttft.observe(t - start)
            else:
                metrics.inter_token.observe(t - last)
            last = t
        return llm.result(seq, options)

    async def prepare(body: ChatCompletionRequest) -> tuple[Sequence, ChatOptions]:
        messages = [await fetch_parts(m) for m in body.messages]
        mm = body.mm_processor_kwargs.model_dump(exclude_none=True) if body.mm_processor_kwargs else {}
        thinking = body.chat_template_kwargs.enable_thinking if body.chat_template_kwargs else False
        tools = body.tools if body.tool_choice != "none" else None
        options = ChatOptions.build(
            {**asdict(llm.default_options), **mm},
            {
                "enable_thinking": thinking,
                "tools": tools,
                "tool_choice": body.tool_choice,
                "parallel_tool_calls": body.parallel_tool_calls,
                "normalize_escaped_newlines": body.normalize_escaped_newlines,
            },
        )
        params = body.sampling_params()
        seq = await asyncio.to_thread(llm.prepare, messages, params, options)
        if body.test_output is not None:
            if not config.enable_test_hooks:
                raise InvalidInputError("test_output is only accepted by a server started with --enable-test-hooks")
            seq.forced_output_ids = llm.processor.tokenizer.encode(body.test_output)
        return seq, options

    async def fetch_parts(message: dict) -> dict:
        content = message.get("content")
        if not isinstance(content, list):
            return message
        parts = []
        for part in content:
            media = media_part(part)
            if media is not None:  # every spelling the processor reads goes through the media policy
                kind, source = media
                if isinstance(source, str):
                    source = await fetch_media_async(source, config.media, kind)
                elif not isinstance(source, bytes):
                    raise InvalidInputError(f"a {kind} content part needs {{'{kind}_url': {{'url': ...}}}}")
                part = {"type": kind, kind: source}
            parts.append(part)
        return {**message, "content": parts}

    return app
