"""CORS headers on the responses aiohttp-cors never sees: the router's own 404 and 405.

aiohttp-cors decorates matched routes only, so an unknown path or a wrong method reached
the page without CORS headers and the browser hid the error from it (PROTOCOL §10 §1:
error responses to an allowed origin carry the CORS headers too).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from aiohttp import hdrs, web

Hook = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


def cors_on_router_errors(origins: Iterable[str], exposed: Iterable[str]) -> Hook:
    allowed = frozenset(origins)
    expose = ",".join(exposed)

    async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        if response.status < 400 or hdrs.ACCESS_CONTROL_ALLOW_ORIGIN in response.headers:
            return  # a success, or aiohttp-cors already answered for a matched route
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or not (origin in allowed or "*" in allowed):
            return  # a disallowed origin gets no CORS headers
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
        response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = expose
        response.headers.add(hdrs.VARY, hdrs.ORIGIN)

    return add_cors_headers
