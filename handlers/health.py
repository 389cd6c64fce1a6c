"""Liveness and readiness for orchestrators and load balancers."""

from __future__ import annotations

from aiohttp import web

from handlers.http import json_response
from server.errors import Unavailable
from server.keys import broker_key, pool_key
from server.storage.db import database_ready


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks = {
        "database": await database_ready(request.app[pool_key]),
        "listener": request.app[broker_key].connected,
    }
    failing = sorted(name for name, ok in checks.items() if not ok)
    if failing:
        raise Unavailable(f"Not ready: {', '.join(failing)} unavailable", headers={"Retry-After": "1"})
    return json_response({"status": "ok", "checks": checks})
