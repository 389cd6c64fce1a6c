"""create_app(settings): the whole assembly, top to bottom."""

from __future__ import annotations

import aiohttp_cors
from aiohttp import web

from handlers import health
from middlewares.access_log import access_log_middleware
from middlewares.errors import errors_middleware
from middlewares.request_id import request_id_middleware, set_request_id_header
from middlewares.security import security_headers
from server import db
from server.keys import settings_key
from server.settings import Settings

EXPOSED_HEADERS = ("X-Request-Id", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "Retry-After")


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=settings.limits.body_bytes,
        middlewares=[
            request_id_middleware,
            access_log_middleware,
            errors_middleware,
        ],
    )
    app[settings_key] = settings

    app.cleanup_ctx.append(db.pool_ctx)

    app.on_response_prepare.append(set_request_id_header)
    app.on_response_prepare.append(security_headers(settings.server.trusted_proxies))

    add_routes(app)
    enable_cors(app, settings)
    return app


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)


def enable_cors(app: web.Application, settings: Settings) -> None:
    options = aiohttp_cors.ResourceOptions(
        allow_credentials=True,
        expose_headers=EXPOSED_HEADERS,
        allow_headers="*",
        max_age=settings.cors.max_age,
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in settings.cors.origins})
    for route in list(app.router.routes()):
        if not isinstance(route.resource, web.StaticResource):
            cors.add(route)
