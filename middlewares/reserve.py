"""Connections in reserve (past the worker's soft connection cap) serve only health checks
and admins: what the reserve is kept for (server/web/protocol.py)."""

from __future__ import annotations

from aiohttp import web

from server.errors import Unavailable
from server.keys import identity_key

RESERVE_PATHS = frozenset({"/healthz", "/readyz"})


@web.middleware
async def reserve_middleware(request: web.Request, handler):
    if getattr(request.protocol, "in_reserve", False):
        identity = request[identity_key]
        if request.path not in RESERVE_PATHS and not (identity is not None and identity.is_admin):  # type: ignore[attr-defined]
            raise Unavailable(
                "The server is at its connection limit; try again shortly",
                headers={"Retry-After": "1", "Connection": "close"},
            )
    return await handler(request)
