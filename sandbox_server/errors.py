"""Every error the HTTP API answers, as JSON: ``{"error": {"code", "message", "node", "source"}}``.

    raise ApiError(404, "job_not_found", "no job job_abc for this key; check the id")
    register_error_handlers(app)      # ApiError, Werkzeug's HTTP errors (404, 405, 413...) and crashes -> JSON

``code`` is stable for machines (docs/api.md lists them all); ``message`` says what to do. A view
never builds an error response itself: it raises ``ApiError`` and the handler formats it. Nothing
answers an HTML page, not even an unknown route or a crash (500 ``internal_error``, logged with
its traceback).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

# Werkzeug's errors (raised before a view runs, or by Flask itself) -> our codes and messages
_HTTP_CODES: dict[int, tuple[str, str]] = {
    400: ("bad_request", "the request is malformed"),
    404: ("not_found", "no such route; see docs/api.md for the routes of API v1"),
    405: ("method_not_allowed", "this route does not take this HTTP method; see the Allow header"),
    413: ("request_too_large", "the request body is larger than the server accepts; save smaller inputs "
                               "or split the work into several jobs"),
    500: ("internal_error", "the server failed on this request; this is a server bug, please report it"),
}
_DROP_HEADERS = frozenset({"content-type", "content-length"})


class ApiError(Exception):
    """An answer other than success: HTTP ``status``, a stable ``code``, and a ``message`` saying what to do.

    ``node`` and ``source`` point at the user's graph node and source line when a node is at fault;
    ``headers`` are added to the response (e.g. ``Retry-After``).
    """

    def __init__(self, status: int, code: str, message: str, node: int | None = None, source: str = "",
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status} [{code}] {message}")
        self.status = status
        self.code = code
        self.message = message
        self.node = node
        self.source = source
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "node": self.node, "source": self.source}}


def error_response(err: ApiError) -> Response:
    response = jsonify(err.body())
    response.status_code = err.status
    response.headers["Cache-Control"] = "no-store"
    for name, value in err.headers.items():
        response.headers[name] = value
    return response


def register_error_handlers(app: Flask) -> None:
    """Answer every error of ``app`` as JSON."""
    app.register_error_handler(ApiError, error_response)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _crash)


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    code, message = _HTTP_CODES.get(status, (_code_of(exc), exc.description or exc.name))
    headers = {k: v for k, v in exc.get_headers() if k.lower() not in _DROP_HEADERS}
    return error_response(ApiError(status, code, message, headers=headers))


def _crash(exc: Exception) -> Response:
    from flask import current_app

    current_app.logger.exception("unhandled error: %r", exc)
    return error_response(ApiError(500, "internal_error", "the server failed on this request; this is a server "
                                   "bug, please report it with the time of the request"))


def _code_of(exc: HTTPException) -> str:
    return (exc.name or "http_error").lower().replace(" ", "_").replace("-", "_")
