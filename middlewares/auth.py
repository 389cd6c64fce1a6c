"""Who is calling: bearer token, session cookie, or (WS/SSE only) ?access_token.

Only a present but invalid credential is refused here (401); what an identity may do
is decided next to the handlers. Cookie-authenticated unsafe requests and WebSocket
upgrades must come from a trusted Origin (CSRF and cross-site WebSocket hijacking).
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web
from aiohttp_session import get_session, session_middleware
from aiohttp_session.cookie_storage import EncryptedCookieStorage

from middlewares.limiter import charge, is_limited
from middlewares.reserve import check_reserve
from server.errors import ApiError, Forbidden, Unauthorized
from server.identity.auth import Identity
from server.identity.secrets import load_or_create_secret
from server.keys import (
    authenticator_key,
    identity_key,
    metrics_token_key,
    sessions_key,
    settings_key,
    users_key,
)
from server.settings import AuthSettings
from server.web.net import is_tls

SESSION_COOKIE = "herald_session"
QUERY_TOKEN_PATHS = frozenset({"/ws", "/sse"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SESSION_PATHS = frozenset({"/api/auth/login", "/api/auth/logout"})
# Logging in again replaces the session, so the old cookie is neither used nor Origin-checked.
COOKIE_IGNORED_PATHS = frozenset({"/api/auth/login"})


def session_middleware_for(settings: AuthSettings):
    """aiohttp-session's middleware with Herald's encrypted cookie; the front door runs a
    request through it only where a session can matter (`needs_session`)."""
    secret = settings.session_secret or load_or_create_secret(settings.secrets_dir, "session_secret")
    storage = EncryptedCookieStorage(
        hashlib.sha256(secret.encode()).digest(),
        cookie_name=SESSION_COOKIE,
        httponly=True,
        samesite="Lax",
        max_age=settings.session_ttl,
    )
    return session_middleware(storage)


def needs_session(request: web.Request) -> bool:
    """A request carrying the cookie, or login and logout; everything else skips the session's work and frame."""
    return has_session_cookie(request) or request.path in SESSION_PATHS


def has_session_cookie(request: web.Request) -> bool:
    """Without parsing the Cookie header (request.cookies does) when it cannot hold ours."""
    header = request.headers.get("Cookie")
    return header is not None and SESSION_COOKIE in header and SESSION_COOKIE in request.cookies


async def authorize(request: web.Request) -> None:
    """Who is calling, then their rate limit (PROTOCOL §8): the two always run together,
    in this order (the bucket is the identity's)."""
    limited = is_limited(request)
    try:
        identity = request[identity_key] = await identify(request)
    except ApiError:
        # A refused credential still costs its client IP a token: guessing is limited too.
        if limited:
            charge(request, None)
        raise
    check_reserve(request, identity)
    if limited:
        charge(request, identity)


def is_metrics_token(request: web.Request, header: str) -> bool:
    """/metrics also accepts metrics.token, which is not a JWT."""
    token = request.app[settings_key].metrics.token
    expected = f"Bearer {token}".encode()
    return request.path == "/metrics" and bool(token) and hmac.compare_digest(header.encode(errors="replace"), expected)


async def identify(request: web.Request) -> Identity | None:
    header = request.headers.get("Authorization")
    if header is not None and is_metrics_token(request, header):
        request[metrics_token_key] = True
        return None
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("The Authorization header must be 'Bearer <token>'")
        return await identity_from_token(request.app, token.strip(), via="bearer")
    if request.path in QUERY_TOKEN_PATHS and "access_token" in request.query:
        return await identity_from_token(request.app, request.query["access_token"], via="query")
    if has_session_cookie(request) and request.path not in COOKIE_IGNORED_PATHS:
        identity = await identity_from_session(request)
        if identity is not None:
            check_origin(request)
        return identity
    return None


async def identity_from_token(app: web.Application, token: str, via: str) -> Identity:
    return await app[authenticator_key].identity_for(token, via)


async def identity_from_session(request: web.Request) -> Identity | None:
    """The session's user; a stale cookie (logged out, expired) is just no credential."""
    session = await get_session(request)
    session_id = session.get("sid")
    if not isinstance(session_id, str):
        return None
    live = await request.app[sessions_key].lookup(session_id)
    user = await request.app[users_key].active_user(str(live[0])) if live is not None else None
    if live is None or user is None:
        session.invalidate()
        return None
    # The session's end is the identity's expiry: a WebSocket or stream opened with this
    # cookie closes then (4401), as one opened with a token does when the token expires.
    expires = live[1].timestamp()
    return Identity(
        str(user.id), user.username, frozenset(user.roles), via="cookie", expires=expires, session=session_id
    )


def own_origin(request: web.Request) -> str:
    scheme = "https" if is_tls(request, request.app[settings_key].server.trusted_proxies) else "http"
    return f"{scheme}://{request.host}"


def check_origin(request: web.Request) -> None:
    is_upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    if request.method in SAFE_METHODS and not is_upgrade:
        return
    origin = request.headers.get("Origin")
    if origin and (origin == own_origin(request) or origin in request.app[settings_key].cors.origins):
        return
    raise Forbidden("A cookie-authenticated request must come from a trusted Origin")
