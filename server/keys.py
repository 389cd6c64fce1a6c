"""Every piece of application state, behind a typed web.AppKey: the app at a glance."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

if TYPE_CHECKING:
    from server.settings import Settings

settings_key: web.AppKey[Settings] = web.AppKey("settings_key")
pool_key = web.AppKey("pool_key", asyncpg.Pool)

# Per-request state, set by the middlewares.
request_id_key = web.RequestKey("request_id_key", str)
