"""Every piece of application state, behind a typed web.AppKey: the app at a glance."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

if TYPE_CHECKING:
    from server.auth import TokenService
    from server.broker import Broker
    from server.events import EventStore
    from server.hub import Hub
    from server.limiter import Decision, RateLimiter
    from server.logs import AccessLog
    from server.metrics import Metrics
    from server.permissions import CompiledRule
    from server.presence import Presence
    from server.sessions import SessionStore
    from server.settings import Settings
    from server.static import StaticFiles
    from server.users import UserStore

settings_key: web.AppKey[Settings] = web.AppKey("settings_key")
pool_key = web.AppKey("pool_key", asyncpg.Pool)
tokens_key: web.AppKey[TokenService] = web.AppKey("tokens_key")
users_key: web.AppKey[UserStore] = web.AppKey("users_key")
sessions_key: web.AppKey[SessionStore] = web.AppKey("sessions_key")
rules_key: web.AppKey[tuple[CompiledRule, ...]] = web.AppKey("rules_key")
store_key: web.AppKey[EventStore] = web.AppKey("store_key")
hub_key: web.AppKey[Hub] = web.AppKey("hub_key")
broker_key: web.AppKey[Broker] = web.AppKey("broker_key")
presence_key: web.AppKey[Presence] = web.AppKey("presence_key")
limiter_key: web.AppKey[RateLimiter] = web.AppKey("limiter_key")
metrics_key: web.AppKey[Metrics] = web.AppKey("metrics_key")
static_key: web.AppKey[StaticFiles] = web.AppKey("static_key")
access_log_key: web.AppKey[AccessLog] = web.AppKey("access_log_key")

# Per-request state, set by the middlewares.
request_id_key = web.RequestKey("request_id_key", str)
identity_key = web.RequestKey("identity_key", object)  # server.auth.Identity | None
ratelimit_key: web.RequestKey[Decision] = web.RequestKey("ratelimit_key")
metrics_token_key = web.RequestKey("metrics_token_key", bool)  # the caller showed metrics.token
