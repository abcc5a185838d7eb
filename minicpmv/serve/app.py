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
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from minicpmv.llm import LLM
from minicpmv.serve import anthropic, completions, lora_routes, ollama, openai_chat, responses, tokenize
from minicpmv.serve.config import ServerConfig
from minicpmv.serve.errors import HTTPError
from minicpmv.serve.metrics import Metrics
from minicpmv.serve.protocol import error_body

__all__ = ["ServerConfig", "create_app"]

PROTECTED = ("/v1/", "/api/", "/tokenize", "/detokenize")  # what --api-key guards
# the protocols whose error bodies are not OpenAI's
ERROR_BODIES = [("/api/", ollama.error_body), ("/v1/messages", anthropic.error_body)]

log = logging.getLogger("minicpmv.serve")


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
    metrics = Metrics()
    app = FastAPI(title="minicpmv", docs_url=None, redoc_url=None)
    app.state.metrics, app.state.llm = metrics, llm
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    def error_response(status: int, message: str, kind: str, param: str | None = None, path: str = "") -> JSONResponse:
        metrics.error(status)
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        body = next((make for prefix, make in ERROR_BODIES if path.startswith(prefix)), error_body)
        return JSONResponse(body(message, kind, status, param), status_code=status, headers=headers)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return error_response(exc.status, exc.message, exc.kind, exc.param, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                  "invalid_request_error", path=request.url.path)
        if first.get("loc") == ("body",) and "json" not in request.headers.get("content-type", ""):
            return error_response(400, "send the request as JSON (Content-Type: application/json)", "invalid_request_error",
                                  path=request.url.path)
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return error_response(400, message, "invalid_request_error", where or None, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", path=request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error")
        return error_response(500, f"internal error ({type(exc).__name__})", "internal_error", path=request.url.path)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if config.api_key and request.url.path.startswith(PROTECTED):
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer":
                key = request.headers.get("x-api-key", "")  # Anthropic's spelling
            if not secrets.compare_digest(key.encode(), config.api_key.encode()):
                return error_response(401, "missing or wrong API key", "authentication_error", path=request.url.path)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(llm.engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        base = {"id": config.model_name, "object": "model", "created": created, "owned_by": "minicpmv"}
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
