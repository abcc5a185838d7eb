"""The HTTP server: auth, body limit, error mapping, /v1/models, /health, /metrics, the web chat (/ and its files
under /web/); each protocol's routes come from its own module (openai_chat.py: /v1/chat/completions)."""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from minicpmv.llm import LLM
from minicpmv.serve import anthropic, completions, lora_routes, ollama, openai_chat, responses, tokenize
from minicpmv.serve.config import ServerConfig
from minicpmv.serve.errors import HTTPError
from minicpmv.serve.lifecycle import Drain, Lifecycle
from minicpmv.serve.metrics import Metrics
from minicpmv.serve.protocol import error_body

__all__ = ["ServerConfig", "create_app"]

PROTECTED = ("/v1/", "/api/", "/tokenize", "/detokenize")  # what --api-key guards
# the protocols whose error bodies are not OpenAI's
ERROR_BODIES = [("/api/", ollama.error_body), ("/v1/messages", anthropic.error_body)]

log = logging.getLogger("minicpmv.serve")
access_log = logging.getLogger("minicpmv.access")


def model_card_extras(llm: LLM, config: ServerConfig) -> dict:
    """What /v1/models says beyond OpenAI's fields: the context (as vLLM does) and whether the weights are a
    random-weight demo (the web chat shows a banner then)."""
    extras = {"max_model_len": llm.engine.max_model_len, "demo_random_weights": llm.demo,
              "default_max_tokens": config.default_max_tokens}
    if getattr(llm, "weights_format", None):  # a GPTQ / AWQ / bitsandbytes / GGUF checkpoint: what was loaded how
        extras["weights_format"] = llm.weights_format
    return extras


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


class ApiKeyAuth:
    """ASGI middleware: 401 on /v1/* without ``Authorization: Bearer KEY``. (Pure ASGI, not Starlette's
    BaseHTTPMiddleware, which hides a client's disconnect from the route and so kept hung-up requests running.)"""

    def __init__(self, app, api_key: str, metrics: Metrics):
        self.app, self.key, self.metrics = app, api_key.encode(), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":
            key = headers.get(b"x-api-key", b"")  # Anthropic's spelling
        if secrets.compare_digest(key, self.key):
            return await self.app(scope, receive, send)
        self.metrics.error(401)
        access_log.info("%s %s 401 missing or wrong API key", scope.get("method", ""), scope["path"])
        make = next((make for prefix, make in ERROR_BODIES if scope["path"].startswith(prefix)), error_body)
        body = json.dumps(make("missing or wrong API key", "authentication_error", 401, None)).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    metrics = Metrics(llm.engine, config.model_name)
    app = FastAPI(title="minicpmv", docs_url=None, redoc_url=None)
    app.state.metrics, app.state.llm = metrics, llm
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyAuth, api_key=config.api_key, metrics=metrics)
    app.state.drain = Drain()
    app.add_middleware(Lifecycle, drain=app.state.drain)  # outermost: counts every request, 503 once shutting down

    def error_response(request: Request, status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
        metrics.error(status)
        if not getattr(request.state, "access_logged", False):
            access_log.info("%s %s %d %s%s", request.method, request.url.path, status, message,
                            f" (param {param})" if param else "")
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        body = next((make for prefix, make in ERROR_BODIES if request.url.path.startswith(prefix)), error_body)
        return JSONResponse(body(message, kind, status, param), status_code=status, headers=headers)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return error_response(request, exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(request, 400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                  "invalid_request_error")
        if first.get("loc") == ("body",) and "json" not in request.headers.get("content-type", ""):
            return error_response(request, 400, "send the request as JSON (Content-Type: application/json)", "invalid_request_error")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return error_response(request, 400, message, "invalid_request_error", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, exc: StarletteHTTPException):
        return error_response(request, exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error")
        return error_response(request, 500, f"internal error ({type(exc).__name__})", "internal_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        base = {"id": config.model_name, "object": "model", "created": created, "owned_by": "minicpmv",
                **model_card_extras(llm, config)}
        return {"object": "list", "data": [base, *lora_routes.model_cards(llm, config.model_name, created)]}

    web = Path(__file__).with_name("web")
    page = (web / "index.html").read_text() if (web / "index.html").is_file() else None
    if web.is_dir():  # the page's own files: favicon, pinned Markdown/KaTeX/highlighting libraries (no CDN)
        app.mount("/web", StaticFiles(directory=web), name="web")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        if page is None:
            raise HTTPError(404, "the web chat page is not installed")
        return HTMLResponse(page)

    app.include_router(openai_chat.router(llm, config, metrics))
    app.include_router(completions.router(llm, config, metrics))
    app.include_router(tokenize.router(llm, config, metrics))
    app.include_router(responses.router(llm, config, metrics))
    app.include_router(ollama.router(llm, config, metrics))
    app.include_router(anthropic.router(llm, config, metrics))
    if config.enable_lora_loading:
        lora_routes.install(app, llm)
    return app
