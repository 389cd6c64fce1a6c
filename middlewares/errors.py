"""The one place that turns exceptions into responses: RFC 9457 problem documents."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus

import orjson
from aiohttp import web

from server.errors import ApiError, code_for_status
from server.keys import request_id_key
from server.storage.db import DATABASE_DOWN_ERRORS

log = logging.getLogger("herald.errors")

# Headers of aiohttp's own exceptions that still mean something on a problem response.
KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After", "Location")


def problem_response(
    request: web.Request,
    status: int,
    detail: str,
    *,
    code: str | None = None,
    errors: Sequence[Mapping[str, str]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code or code_for_status(status),
        "request_id": request.get(request_id_key),
    }
    if errors:
        body["errors"] = list(errors)
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/problem+json",
        headers=headers,
    )


def _detail_for_http_exception(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"No route for {request.method} {request.path}"
    if exc.status == 405:
        return f"{request.method} is not allowed on {request.path}"
    if exc.status == 413:
        return f"Request body is larger than {request.client_max_size} bytes"
    return exc.reason


def problem_for_exception(request: web.Request, exc: Exception) -> web.Response:
    """The answer to an exception a handler raised (the front door calls this for every
    request). aiohttp's redirects (HTTPException below 400) are not errors: raised again."""
    if isinstance(exc, ApiError):
        return problem_response(
            request, exc.status, exc.detail or exc.title, code=exc.code, errors=exc.errors, headers=exc.headers
        )
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        kept = {name: exc.headers[name] for name in KEPT_HEADERS if name in exc.headers}
        return problem_response(request, exc.status, _detail_for_http_exception(request, exc), headers=kept)
    if isinstance(exc, DATABASE_DOWN_ERRORS):
        log.warning("database unavailable: %s", type(exc).__name__)
        return problem_response(
            request, 503, "The database is unavailable; try again shortly", headers={"Retry-After": "1"}
        )
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
    return problem_response(request, 500, "An internal error occurred; the request id identifies it in the logs")
