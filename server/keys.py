"""Every piece of application state, behind a typed web.AppKey: the app at a glance."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

if TYPE_CHECKING:
    from middlewares.front_door import FrontDoor
    from server.events.broker import Broker
    from server.events.store import EventStore
    from server.identity.auth import TokenService
    from server.identity.identify import Authenticator
    from server.identity.issuers import Issuers
    from server.identity.permissions import CompiledRule
    from server.identity.revocations import Revocations
    from server.identity.sessions import SessionStore
    from server.identity.users import UserStore
    from server.limits.limiter import Decision, RateLimiter
    from server.ops.logs import AccessLog
    from server.ops.metrics import Metrics
    from server.ops.throttle import ThrottledLog
    from server.process.drain import Drain
    from server.realtime.hub import Hub
    from server.realtime.presence import Presence
    from server.realtime.roster import Roster
    from server.settings import Settings
    from server.web.static import StaticFiles

settings_key: web.AppKey[Settings] = web.AppKey("settings_key")
pool_key = web.AppKey("pool_key", asyncpg.Pool)
tokens_key: web.AppKey[TokenService] = web.AppKey("tokens_key")
users_key: web.AppKey[UserStore] = web.AppKey("users_key")
sessions_key: web.AppKey[SessionStore] = web.AppKey("sessions_key")
issuers_key: web.AppKey[Issuers] = web.AppKey("issuers_key")
revocations_key: web.AppKey[Revocations] = web.AppKey("revocations_key")
authenticator_key: web.AppKey[Authenticator] = web.AppKey("authenticator_key")  # identity's one front door
rules_key: web.AppKey[tuple[CompiledRule, ...]] = web.AppKey("rules_key")
store_key: web.AppKey[EventStore] = web.AppKey("store_key")
hub_key: web.AppKey[Hub] = web.AppKey("hub_key")
broker_key: web.AppKey[Broker] = web.AppKey("broker_key")
presence_key: web.AppKey[Presence] = web.AppKey("presence_key")
roster_key: web.AppKey[Roster] = web.AppKey("roster_key")
limiter_key: web.AppKey[RateLimiter] = web.AppKey("limiter_key")
metrics_key: web.AppKey[Metrics] = web.AppKey("metrics_key")
static_key: web.AppKey[StaticFiles] = web.AppKey("static_key")
access_log_key: web.AppKey[AccessLog] = web.AppKey("access_log_key")
drain_key: web.AppKey[Drain] = web.AppKey("drain_key")
front_door_key: web.AppKey[FrontDoor] = web.AppKey("front_door_key")  # every request's one frame
refusals_log_key: web.AppKey[ThrottledLog] = web.AppKey("refusals_log_key")  # caps and guards that refuse

# Per-request state, set by the front door.
request_id_key = web.RequestKey("request_id_key", str)
identity_key = web.RequestKey("identity_key", object)  # server.identity.auth.Identity | None
ratelimit_key: web.RequestKey[Decision] = web.RequestKey("ratelimit_key")
metrics_token_key = web.RequestKey("metrics_token_key", bool)  # the caller showed metrics.token
