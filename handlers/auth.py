"""Login, logout and who-am-I (PROTOCOL §2)."""

from __future__ import annotations

from aiohttp import web
from aiohttp_session import get_session, new_session

from handlers.http import json_response, read_json_object, require_identity
from server.errors import Unauthorized, ValidationError
from server.keys import limiter_key, sessions_key, settings_key, tokens_key, users_key
from server.limits.limiter import refusal
from server.settings import LimitsSettings
from server.web.net import client_ip


async def login(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    username, password = body.get("username"), body.get("password")
    for name, value in (("username", username), ("password", password)):
        if not isinstance(value, str):
            raise ValidationError.field(name, "is required and must be a string")
    buckets = check_login_rate(request, username)
    user = await request.app[users_key].authenticate(username, password)
    if user is None:
        raise Unauthorized("Invalid username or password")
    refund_login_rate(request, buckets)
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


def check_login_rate(request: web.Request, username: str) -> tuple[tuple[str, int], ...]:
    """Login's own buckets: login_ip_rate per minute per client IP, login_rate per (username, IP).

    There is no bucket per username alone: failures from elsewhere would spend it, and
    anyone could keep any account locked out. A right password gets its tokens back
    (refund_login_rate), so only failures count and an address without failures gets in.
    """
    settings = request.app[settings_key]
    ip = client_ip(request, settings.server.trusted_proxies)
    buckets = login_buckets(settings.limits, username, ip)
    taken: list[tuple[str, int]] = []
    for key, rate in buckets:
        decision = request.app[limiter_key].take(key, rate / 60, rate)
        if not decision.allowed:
            refund_login_rate(request, tuple(taken))
            raise refusal(decision, "Too many login attempts")
        taken.append((key, rate))
    return buckets


def login_buckets(limits: LimitsSettings, username: str, ip: str) -> tuple[tuple[str, int], ...]:
    """(bucket, attempts per minute): one per address, one per (username, address)."""
    return ((f"login-ip:{ip}", limits.login_ip_rate), (f"login-user-ip:{username.lower()}\n{ip}", limits.login_rate))


def refund_login_rate(request: web.Request, buckets: tuple[tuple[str, int], ...]) -> None:
    limiter = request.app[limiter_key]
    for key, rate in buckets:
        limiter.refund(key, rate)


async def logout(request: web.Request) -> web.Response:
    require_identity(request)
    session = await get_session(request)
    if isinstance(session_id := session.get("sid"), str):
        await request.app[sessions_key].end(session_id)
    session.invalidate()
    return web.Response(status=204)


async def me(request: web.Request) -> web.Response:
    return json_response(require_identity(request).public())
