"""Token-bucket rate limits (PROTOCOL §8): per user, else per client IP; 429 before the handler."""

from __future__ import annotations

from aiohttp import web

from server.keys import identity_key, limiter_key, ratelimit_key, settings_key
from server.limiter import bucket_key, refusal
from server.net import client_ip

REALTIME_PATHS = frozenset({"/ws", "/sse"})


def is_limited(request: web.Request) -> bool:
    if request.method == "OPTIONS":  # CORS preflights are the browser's, not the caller's
        return False
    return request.path.startswith("/api/") or request.path in REALTIME_PATHS


def request_bucket(request: web.Request) -> str:
    ip = client_ip(request, request.app[settings_key].server.trusted_proxies)
    return bucket_key(request[identity_key], ip)  # type: ignore[arg-type]


@web.middleware
async def limiter_middleware(request: web.Request, handler):
    if is_limited(request):
        decision = request.app[limiter_key].take_request(request.app[settings_key].limits, request_bucket(request))
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
