"""Token-bucket rate limits (PROTOCOL §8): per user, else per client IP; 429 before the handler."""

from __future__ import annotations

from aiohttp import web

from server.keys import identity_key, limiter_key, ratelimit_key, settings_key
from server.limiter import Decision, RateLimiter, refusal
from server.net import client_ip
from server.settings import Settings

REALTIME_PATHS = frozenset({"/ws", "/sse"})


def is_limited(request: web.Request) -> bool:
    if request.method == "OPTIONS":  # CORS preflights are the browser's, not the caller's
        return False
    return request.path.startswith("/api/") or request.path in REALTIME_PATHS


def bucket_key(request: web.Request) -> str:
    identity = request[identity_key]
    if identity is not None:
        return f"user:{identity.id}"  # type: ignore[attr-defined]
    return f"ip:{client_ip(request, request.app[settings_key].server.trusted_proxies)}"


def take(limiter: RateLimiter, settings: Settings, key: str) -> Decision | None:
    """One request's worth from the general bucket; None when limiting is off (rate = 0)."""
    limits = settings.limits
    if limits.rate <= 0:
        return None
    return limiter.take(key, limits.rate, limits.burst)


@web.middleware
async def limiter_middleware(request: web.Request, handler):
    if is_limited(request):
        decision = take(request.app[limiter_key], request.app[settings_key], bucket_key(request))
        if decision is not None:
            request[ratelimit_key] = decision
            if not decision.allowed:
                raise refusal(decision)
    return await handler(request)


async def add_ratelimit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: limited responses, streams and 429s included, show the bucket."""
    decision = request.get(ratelimit_key)
    if decision is not None:
        response.headers["RateLimit-Limit"] = str(decision.limit)
        response.headers["RateLimit-Remaining"] = str(decision.remaining)
        response.headers["RateLimit-Reset"] = str(decision.reset)
