"""The front door: the one middleware frame and the one response hook every request passes.

Four concerns always run together, for every request, in a fixed order: the request id
(request_id.py), the answer to any exception (errors.py), the access line and the
request metrics (access_log.py). Each used to be its own middleware frame or prepare
hook; each frame is a coroutine, a partial and an await on every request, so they share
one frame here and each module keeps its rules. Likewise the headers of every response
(X-Request-Id, security headers, RateLimit-*) are set by one on_response_prepare hook
instead of three: streamed responses (SSE, WebSocket, files) get them too.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from middlewares.access_log import record
from middlewares.errors import problem_for_exception
from middlewares.limiter import add_ratelimit_headers
from middlewares.request_id import request_id_for, set_request_id_header
from middlewares.security import security_headers
from server.keys import request_id_key
from server.ops.logs import AccessLog, request_id_var
from server.ops.metrics import Metrics
from server.process.drain import Drain

Hook = Callable[[web.Request, web.StreamResponse], Awaitable[None]]
Middleware = Callable[[web.Request, Callable], Awaitable[web.StreamResponse]]


def front_door(metrics: Metrics, access_log: AccessLog) -> Middleware:
    """The app's first middleware; `metrics` and `access_log` are the app's own (found once
    here, not looked up in the app on every request)."""

    @web.middleware
    async def front_door_middleware(request: web.Request, handler):
        start = time.perf_counter()
        request_id = request_id_for(request.headers.get("X-Request-Id"))
        request[request_id_key] = request_id
        token = request_id_var.set(request_id)
        response = None
        status = 499  # the client went away before an answer (the task was cancelled)
        try:
            try:
                response = await handler(request)
            except Exception as exc:
                if isinstance(exc, web.HTTPException) and exc.status < 400:
                    status = exc.status  # a redirect: aiohttp answers it
                    raise
                response = problem_for_exception(request, exc)
            status = response.status
            return response
        finally:
            record(request, response, status, time.perf_counter() - start, metrics, access_log)
            request_id_var.reset(token)

    return front_door_middleware


def response_headers(trusted_proxies: Sequence[str], drain: Drain | None = None) -> Hook:
    """`drain`: a retiring worker's last responses say Connection: close (server/process/drain.py)."""
    add_security_headers = security_headers(trusted_proxies)

    async def add_response_headers(request: web.Request, response: web.StreamResponse) -> None:
        set_request_id_header(request, response)
        add_security_headers(request, response)
        add_ratelimit_headers(request, response)
        if drain is not None and drain.active:
            drain.last_response(response)

    return add_response_headers
