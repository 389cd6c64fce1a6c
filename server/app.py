"""create_app(settings): the whole assembly, top to bottom."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp_cors
from aiohttp import web

from handlers import auth, batch, channels, events, health, metrics, openapi, revocations, sse, static, users, ws
from handlers.http import expect_continue
from middlewares.cors import cors_on_router_errors
from middlewares.front_door import FrontDoor, install
from server.identity.auth import TokenService
from server.identity.identify import Authenticator
from server.identity.issuers import Issuers
from server.identity.permissions import compile_rules
from server.identity.revocations import Revocations, revocation_lifetime
from server.identity.sessions import SessionStore
from server.identity.users import UserStore
from server.keys import (
    access_log_key,
    authenticator_key,
    drain_key,
    issuers_key,
    limiter_key,
    metrics_key,
    pool_key,
    refusals_log_key,
    revocations_key,
    rules_key,
    sessions_key,
    settings_key,
    static_key,
    tokens_key,
    users_key,
)
from server.limits.limiter import RateLimiter
from server.ops.logs import AccessLog
from server.ops.metrics import Metrics
from server.ops.throttle import ThrottledLog
from server.process.drain import Drain
from server.realtime.engine import close_connections, realtime_ctx
from server.settings import Settings
from server.storage import db
from server.web.static import build_static

EXPOSED_HEADERS = ("X-Request-Id", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "Retry-After")


def create_app(
    settings: Settings, *, limiter: RateLimiter | None = None, access_log: AccessLog | None = None
) -> web.Application:
    """One worker's app. `limiter` is the supervisor's, shared by all workers; tests get
    their own, and may catch the access lines in `access_log`."""
    metrics = Metrics(settings.metrics.sync_interval)
    access_log = access_log or AccessLog()
    app = web.Application(client_max_size=settings.limits.body_bytes)
    app[settings_key] = settings
    app[tokens_key] = TokenService(settings.auth)
    app[issuers_key] = Issuers(settings.auth.issuers)
    app[rules_key] = compile_rules(settings.channels, id_prefixes=(i.id_prefix for i in settings.auth.issuers))
    app[limiter_key] = limiter or RateLimiter()
    app[metrics_key] = metrics
    app[access_log_key] = access_log
    app[refusals_log_key] = ThrottledLog(logging.getLogger("herald.limits"))
    app[static_key] = build_static(Path(settings.server.static_dir), Path(settings.server.static_build_dir))

    app.cleanup_ctx.append(db.pool_ctx)
    app.cleanup_ctx.append(stores_ctx)
    app.cleanup_ctx.append(realtime_ctx)
    app.on_shutdown.append(close_connections)

    app[drain_key] = Drain()
    # Request id, identity, rate limit, error answers, access line, metrics and every
    # response's headers: one frame, around aiohttp's middleware machinery.
    install(app, FrontDoor(settings, metrics, access_log, app[drain_key]))
    app.on_cleanup.append(flush_access_log)

    add_routes(app)
    enable_cors(app, settings)
    return app


async def stores_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key]
    revoked = app[revocations_key] = Revocations(app[pool_key], revocation_lifetime(settings.auth))
    await revoked.reload()
    app[users_key] = UserStore(
        app[pool_key], settings.auth.bcrypt_rounds, revocations=revoked, bcrypt_queue=settings.auth.bcrypt_queue
    )
    app[sessions_key] = SessionStore(app[pool_key], settings.auth.session_ttl)
    app[authenticator_key] = Authenticator(app[tokens_key], app[users_key], app[issuers_key], revoked)
    await app[issuers_key].start()
    try:
        yield
    finally:
        await app[issuers_key].close()


async def flush_access_log(app: web.Application) -> None:
    """The lines of the worker's last loop turn (they are written once per turn)."""
    app[access_log_key].flush()


def add_routes(app: web.Application) -> None:
    router = app.router
    add_body_routes(router)
    router.add_get("/healthz", health.healthz)
    router.add_get("/readyz", health.readyz)
    router.add_get("/metrics", metrics.metrics)
    router.add_post("/api/auth/logout", auth.logout)
    router.add_get("/api/me", auth.me)
    router.add_get("/api/users", users.list_users)
    router.add_delete("/api/users/{id}", users.delete_user)
    router.add_post("/api/revocations", revocations.revoke)
    router.add_get("/api/channels", channels.list_channels)
    router.add_get("/api/channels/{channel}/events", events.history)
    router.add_get("/api/channels/{channel}/presence", channels.presence)
    router.add_post("/api/events", batch.publish_events)
    router.add_post("/api/broadcast", batch.broadcast)
    router.add_get("/api/openapi.json", openapi.document_handler())
    router.add_get("/ws", ws.websocket)
    router.add_get("/sse", sse.sse)
    router.add_get("/", static.index)
    router.add_get("/static/{name}", static.asset)


def add_body_routes(router: web.UrlDispatcher) -> None:
    """Routes that read a body: an oversized one with Expect: 100-continue gets 413, not 100."""
    router.add_post("/api/auth/login", auth.login, expect_handler=expect_continue)
    router.add_post("/api/users", users.create_user, expect_handler=expect_continue)
    router.add_patch("/api/users/{id}", users.update_user, expect_handler=expect_continue)
    router.add_post("/api/channels/{channel}/events", events.publish, expect_handler=expect_continue)


def enable_cors(app: web.Application, settings: Settings) -> None:
    if not settings.cors.origins:
        return  # no origin may call: nothing to add, and no per-response hook to pay for
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
    # After aiohttp-cors's own hook, so it only fills in what that one left out.
    app.on_response_prepare.append(cors_on_router_errors(settings.cors.origins, EXPOSED_HEADERS))
