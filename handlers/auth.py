"""Login, logout and who-am-I (PROTOCOL §2)."""

from __future__ import annotations

from aiohttp import web
from aiohttp_session import get_session, new_session

from handlers.http import json_response, read_json_object, require_identity
from server.errors import Unauthorized, ValidationError
from server.keys import limiter_key, sessions_key, settings_key, tokens_key, users_key
from server.limits.limiter import refusal
from server.web.net import client_ip


async def login(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    username, password = body.get("username"), body.get("password")
    for name, value in (("username", username), ("password", password)):
        if not isinstance(value, str):
            raise ValidationError.field(name, "is required and must be a string")
    check_login_rate(request, username)
    user = await request.app[users_key].authenticate(username, password)
    if user is None:
        raise Unauthorized("Invalid username or password")
    token = request.app[tokens_key].issue(str(user.id), user.username, user.roles)
    session = await new_session(request)
    session["sid"] = await request.app[sessions_key].create(user.id)
    public = user.public()
    return json_response(
        {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": request.app[settings_key].auth.token_ttl,
            "user": {k: public[k] for k in ("id", "username", "roles")},
        }
    )


def check_login_rate(request: web.Request, username: str) -> None:
    """Login's own buckets, per client IP and per username: login_rate per minute each."""
    settings = request.app[settings_key]
    rate = settings.limits.login_rate
    ip = client_ip(request, settings.server.trusted_proxies)
    for key in (f"login-ip:{ip}", f"login-user:{username.lower()}"):
        decision = request.app[limiter_key].take(key, rate / 60, rate)
        if not decision.allowed:
            raise refusal(decision, "Too many login attempts")


async def logout(request: web.Request) -> web.Response:
    require_identity(request)
    session = await get_session(request)
    if isinstance(session_id := session.get("sid"), str):
        await request.app[sessions_key].end(session_id)
    session.invalidate()
    return web.Response(status=204)


async def me(request: web.Request) -> web.Response:
    return json_response(require_identity(request).public())
