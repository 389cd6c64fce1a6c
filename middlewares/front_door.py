"""The front door: the one frame every request passes, and the one place response headers are set.

What every request gets runs here together, in a fixed order: the request id
(request_id.py), who is calling and their rate limit (auth.py, limiter.py; inside
aiohttp-session's middleware only where a session can matter), the answer to any
exception (errors.py), the access line and the request metrics (access_log.py). Each
module keeps its rules; this one only orders them.

Issue 12 measured what aiohttp's machinery around them cost per request, and this goes
around it. `install()` makes the front door the app's request handler in place of
`Application._handle`, which resolved the route and then ran a chain of middleware
frames (two of Herald's and one aiohttp adds per app, each a coroutine and an await);
the front door resolves the route itself and calls the handler from its one frame. The
headers of every response (X-Request-Id, security headers, RateLimit-*, a retiring
worker's Connection: close) are set from `HeraldRequest._prepare_hook`, which aiohttp
calls as each response, streamed ones included, is about to send its head, instead of
through an on_response_prepare signal; the signal still runs after it when something
(aiohttp-cors) is listening. Both are aiohttp internals (`Application._handle`,
`_make_request`'s `_cls`, `Request._prepare_hook`): tests/test_lean_chain.py fails
loudly if an aiohttp upgrade moves them.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from middlewares.access_log import record
from middlewares.auth import authorize, needs_session, session_middleware_for
from middlewares.errors import problem_for_exception
from middlewares.limiter import add_ratelimit_headers
from middlewares.request_id import request_id_for, set_request_id_header
from middlewares.security import security_headers
from server.keys import front_door_key, request_id_key
from server.ops.logs import AccessLog, request_id_var
from server.ops.metrics import Metrics
from server.process.drain import Drain
from server.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FrontDoor:
    def __init__(self, settings: Settings, metrics: Metrics, access_log: AccessLog, drain: Drain | None) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self.drain = drain
        self.with_session = session_middleware_for(settings.auth)
        self.add_security_headers = security_headers(settings.server.trusted_proxies)

    async def handle(self, request: web.Request, app: web.Application) -> web.StreamResponse:
        """Application._handle's work (route, Expect), then the request through the front door."""
        match_info = await app.router.resolve(request)
        match_info.add_app(app)
        match_info.freeze()
        request._match_info = match_info
        if request.headers.get(hdrs.EXPECT):
            answer = await match_info.expect_handler(request)
            await request.writer.drain()
            if answer is not None:
                return answer
        return await self.serve(request, match_info.handler)

    async def serve(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        request_id = request_id_for(request.headers.get("X-Request-Id"))
        request[request_id_key] = request_id
        token = request_id_var.set(request_id)
        response = None
        status = 499  # the client went away before an answer (the task was cancelled)
        try:
            try:
                if needs_session(request):
                    response = await self.with_session(request, functools.partial(_authorized, handler=handler))
                else:
                    await authorize(request)
                    response = await handler(request)
            except Exception as exc:
                if isinstance(exc, web.HTTPException) and exc.status < 400:
                    status = exc.status  # a redirect: aiohttp answers it
                    raise
                response = problem_for_exception(request, exc)
            status = response.status
            return response
        finally:
            record(request, response, status, time.perf_counter() - start, self.metrics, self.access_log)
            request_id_var.reset(token)

    def add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        set_request_id_header(request, response)
        self.add_security_headers(request, response)
        add_ratelimit_headers(request, response)
        if self.drain is not None and self.drain.active:
            self.drain.last_response(response)  # a retiring worker's last responses say Connection: close


async def _authorized(request: web.Request, handler: Handler) -> web.StreamResponse:
    await authorize(request)
    return await handler(request)


class HeraldRequest(web.Request):
    """aiohttp's Request, with the front door's headers set just before a response's head goes out."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        match_info = self._match_info
        if match_info is None:
            return
        match_info.current_app[front_door_key].add_headers(self, response)
        if match_info.current_app.on_response_prepare:  # aiohttp-cors, when CORS origins are set
            await super()._prepare_hook(response)


def install(app: web.Application, front_door: FrontDoor) -> None:
    """Make the front door `app`'s request handler (for every runner: the worker's, the tests')."""
    app[front_door_key] = front_door
    app._handle = functools.partial(front_door.handle, app=app)  # type: ignore[method-assign]
    app._make_request = functools.partial(app._make_request, _cls=HeraldRequest)  # type: ignore[method-assign]
