"""Our exceptions as HTTP errors: only bad input (``InvalidInputError``) is the client's fault; anything else that
escapes is a 500, streaming or not."""

from __future__ import annotations

from minicpmv.errors import EngineClosedError, InvalidInputError, QueueFullError


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def status_of(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, QueueFullError):
        return 429, "rate_limit_error"
    if isinstance(exc, EngineClosedError):
        return 503, "service_unavailable"
    if isinstance(exc, InvalidInputError):
        return 400, "invalid_request_error"
    return 500, "internal_error"


def http_error(exc: Exception) -> HTTPError:
    """The HTTP error ``exc`` means, with the request field at fault when there is one. A 500 does not show the
    exception's text (it may hold internals); the server logs it. A 503 (shutting down) says so."""
    status, kind = status_of(exc)
    message = str(exc) if status < 500 or status == 503 else f"internal error ({type(exc).__name__})"
    return HTTPError(status, message, kind, getattr(exc, "param", None))
