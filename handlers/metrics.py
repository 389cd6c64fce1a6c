"""GET /metrics: Prometheus text, for admins or the configured metrics token (PROTOCOL §7)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from handlers.http import identity_of
from server.errors import Forbidden, Unauthorized
from server.keys import hub_key, metrics_key, metrics_token_key


async def metrics(request: web.Request) -> web.Response:
    if not request.get(metrics_token_key):
        identity = identity_of(request)
        if identity is None:
            raise Unauthorized("Metrics need an admin or the metrics token")
        if not identity.is_admin:
            raise Forbidden("Metrics need an admin or the metrics token")
    body = request.app[metrics_key].render(request.app.get(hub_key))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
