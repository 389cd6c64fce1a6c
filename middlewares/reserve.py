"""Connections in reserve (past the worker's soft connection cap) serve only health checks
and admins: what the reserve is kept for (server/web/protocol.py). Checked in the auth
frame, once the identity is known."""

from __future__ import annotations

from aiohttp import web

from server.errors import Unavailable
from server.identity.auth import Identity

RESERVE_PATHS = frozenset({"/healthz", "/readyz"})


def check_reserve(request: web.Request, identity: Identity | None) -> None:
    if not getattr(request.protocol, "in_reserve", False) or request.path in RESERVE_PATHS:
        return
    if identity is None or not identity.is_admin:
        raise Unavailable("The server is at its connection limit; try again shortly", headers={"Retry-After": "1"})
