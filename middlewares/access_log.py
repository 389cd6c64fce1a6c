"""One JSON line per request (tokens in query strings redacted), and the request metrics."""

from __future__ import annotations

from aiohttp import web

from server.ops.logs import AccessLog
from server.ops.metrics import Metrics

SECRET_PARAMS = frozenset({"access_token", "token"})


def redacted_path(request: web.Request) -> str:
    if not request.query_string:
        return request.path
    if not SECRET_PARAMS.intersection(request.query):
        return request.path_qs
    query = request.rel_url.query.copy()
    for name in SECRET_PARAMS.intersection(query):
        query[name] = "REDACTED"
    return str(request.rel_url.with_query(query))


def route_name(request: web.Request) -> str:
    """The route template (`/api/channels/{channel}/events`), never the raw path."""
    info = request.match_info
    if info.http_exception is not None or info.route.resource is None:
        return "unmatched"
    return info.route.resource.canonical


def response_bytes(response: web.StreamResponse | None) -> int:
    if response is None:
        return 0
    if response.prepared:
        return response.body_length
    return response.content_length or 0


def record(
    request: web.Request,
    response: web.StreamResponse | None,
    status: int,
    duration: float,
    metrics: Metrics,
    access_log: AccessLog,
) -> None:
    """The request's metrics and its access line (the front door calls this once per request)."""
    route = route_name(request)
    metrics.observe_request(request.method, route, status, duration)
    access_log.write(
        {
            "method": request.method,
            "path": redacted_path(request),
            "route": route,
            "status": status,
            "duration_ms": round(duration * 1000, 3),
            "bytes": response_bytes(response),
            "remote": request.remote,
        }
    )
