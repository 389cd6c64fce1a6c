"""Liveness and readiness for orchestrators and load balancers."""

from __future__ import annotations

from aiohttp import web

from handlers.http import json_response
from server.errors import Unavailable
from server.keys import broker_key, pool_key
from server.storage.db import database_ready


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


LISTENER_WAIT = 0.5  # seconds a readiness probe waits for a listener it just woke


async def readyz(request: web.Request) -> web.Response:
    database = await database_ready(request.app[pool_key])
    broker = request.app[broker_key]
    if database and not broker.connected:
        broker.wake()  # the database is back: the listener need not wait out its backoff
        await broker.wait_connected(LISTENER_WAIT)
    checks = {"database": database, "listener": broker.connected}
    failing = sorted(name for name, ok in checks.items() if not ok)
    if failing:
        raise Unavailable(f"Not ready: {', '.join(failing)} unavailable", headers={"Retry-After": "1"})
    return json_response({"status": "ok", "checks": checks})
