"""The HTTP connection itself, below the app: deadlines, the connection cap, parser errors.

aiohttp's RequestHandler is one connection. Herald's subclass adds what a server exposed
to the internet needs before any middleware can run:

- a header deadline: once a request's first bytes arrive, its line and headers (a
  WebSocket handshake's too) must be complete within `server.header_timeout`, or the
  connection closes. A connection that sends nothing is closed by aiohttp's keep-alive
  timer (`server.keepalive_timeout`), which also ends idle keep-alive connections.
- a cap on open connections per worker that keeps descriptors in reserve: past
  `max_connections - reserved_connections` a connection is "in reserve" and may only ask
  for /healthz, /readyz or use an admin's credentials (middlewares/reserve.py); at
  `max_connections` a new connection takes the place of the oldest reserve connection
  that has not sent a request yet, or is closed at once. The worker never runs out of
  descriptors, and a health check always finds a way in.
- parser errors (a malformed request line, an oversized header) answer a fixed problem
  document with the request id and the security headers, never the request's bytes or
  aiohttp's version, and log one short line, throttled (server/ops/throttle.py).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import uuid
from collections import OrderedDict
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from server.errors import code_for_status
from server.keys import settings_key
from server.ops.throttle import ThrottledLog
from server.web.headers import API_CSP, SECURITY_HEADERS

log = logging.getLogger("herald.http")
DESCRIPTORS_FOR_THE_REST = 128  # pool, listener, logs, files: what auto max_connections leaves aside


def auto_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, soft - DESCRIPTORS_FOR_THE_REST)


class ConnectionGuard:
    """One worker's open connections, and which of them are in reserve."""

    def __init__(self, max_connections: int, reserved: int, header_timeout: float) -> None:
        self.max_connections = max_connections or auto_max_connections()
        self.reserved = min(reserved, self.max_connections - 1)
        self.header_timeout = header_timeout
        self.open = 0
        self.waiting_in_reserve: OrderedDict[HeraldRequestHandler, None] = OrderedDict()
        self.throttled = ThrottledLog(log)

    @property
    def soft_cap(self) -> int:
        return self.max_connections - self.reserved

    def admit(self, handler: HeraldRequestHandler) -> bool:
        """Count a new connection; False if it must be closed at once."""
        if self.open >= self.max_connections:
            if not self.waiting_in_reserve:
                self.throttled.warning("connections full", "refused a connection: the worker is at max_connections")
                return False
            oldest, _ = self.waiting_in_reserve.popitem(last=False)
            self.throttled.warning("connections evicted", "closed an idle reserve connection to admit a new one")
            oldest.force_close()  # its connection_lost uncounts it
        self.open += 1
        if self.open > self.soft_cap:
            handler.in_reserve = True
            self.waiting_in_reserve[handler] = None
            self.throttled.warning(
                "connections reserve", "connection in reserve: only health checks and admins are served"
            )
        return True

    def left(self, handler: HeraldRequestHandler) -> None:
        self.open -= 1
        self.waiting_in_reserve.pop(handler, None)


class HeraldRequestHandler(RequestHandler):
    __slots__ = ("_head_deadline", "guard", "in_reserve")

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.in_reserve = False
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.guard.admit(self):
            transport.abort()  # type: ignore[attr-defined]
            self.guard = None  # type: ignore[assignment]  # never counted: nothing to uncount
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.guard is not None:
            self.guard.left(self)
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.guard is None:
            return
        if self.is_idle():
            # Bytes came, no complete request head yet: start its deadline (once per head).
            if self._head_deadline is None:
                count = self._request_count
                self._head_deadline = self._loop.call_later(self.guard.header_timeout, self._head_overdue, count)
        elif self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        if not self.is_idle() or self._request_count:
            self.guard.waiting_in_reserve.pop(self, None)  # it sent a request: not for eviction

    def is_idle(self) -> bool:
        """Waiting for the next request (not handling one, not upgraded)."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._upgraded

    def _head_overdue(self, count: int) -> None:
        self._head_deadline = None
        if self._request_count == count and self.is_idle():
            self.guard.throttled.warning("header timeout", "closed a connection: request head not complete in time")
            self.force_close()

    async def finish_response(
        self, request: Any, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        if self.in_reserve and not resp.prepared:
            resp.force_close()  # one request per reserve connection: the reserve is for the next
        return await super().finish_response(request, resp, start_time)

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """aiohttp's hook for what never reached the app: a fixed problem body, one short log line."""
        request_id = str(uuid.uuid4())
        if status >= 500:
            log.error("request failed before the app", exc_info=exc, extra={"request_id": request_id})
        elif self.guard is not None:
            self.guard.throttled.warning(
                f"bad request {status}",
                "malformed request",
                status=status,
                reason=type(exc).__name__ if exc else None,
                remote=request.remote,
            )
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        body = {
            "type": "about:blank",
            "title": HTTPStatus(status).phrase,
            "status": status,
            "detail": "The request could not be read" if status < 500 else "An internal error occurred",
            "code": code_for_status(status),
            "request_id": request_id,
        }
        headers = {**SECURITY_HEADERS, "Content-Security-Policy": API_CSP, "X-Request-Id": request_id}
        response = web.Response(
            status=status, body=orjson.dumps(body), content_type="application/problem+json", headers=headers
        )
        response.force_close()
        return response


class HeraldServer(web.Server):
    """aiohttp's Server, making Herald's RequestHandler for each connection."""

    guard: ConnectionGuard

    def __call__(self) -> RequestHandler:
        return HeraldRequestHandler(self, loop=self._loop, guard=self.guard, **self._kwargs)


class HeraldRunner(web.AppRunner):
    """web.AppRunner with Herald's connection handling and the keep-alive timeout from settings.

    Used by the worker (and by tests of these guards) in place of web.AppRunner.
    """

    __slots__ = ("_guard",)

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        server = app[settings_key].server
        kwargs.setdefault("keepalive_timeout", server.keepalive_timeout)
        super().__init__(app, **kwargs)
        self._guard = ConnectionGuard(server.max_connections, server.reserved_connections, server.header_timeout)

    @property
    def guard(self) -> ConnectionGuard:
        return self._guard

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds its Server inside Application; this changes only what each
        # connection's handler is (HeraldServer adds no state but the guard).
        server.__class__ = HeraldServer
        server.guard = self._guard  # type: ignore[attr-defined]
        return server
