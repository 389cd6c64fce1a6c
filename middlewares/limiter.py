"""Token-bucket rate limits (PROTOCOL §8): per user, else per client IP; 429 before the handler
(charged by the auth middleware, right after it knows who is calling)."""

from __future__ import annotations

from aiohttp import web
from multidict import istr

from server.identity.auth import Identity
from server.keys import limiter_key, ratelimit_key, settings_key
from server.limits.limiter import bucket_key, refusal
from server.web.net import client_ip

REALTIME_PATHS = frozenset({"/ws", "/sse"})
RATELIMIT_LIMIT = istr("RateLimit-Limit")
RATELIMIT_REMAINING = istr("RateLimit-Remaining")
RATELIMIT_RESET = istr("RateLimit-Reset")


def is_limited(request: web.Request) -> bool:
    if request.method == "OPTIONS":  # CORS preflights are the browser's, not the caller's
        return False
    return request.path.startswith("/api/") or request.path in REALTIME_PATHS


def charge(request: web.Request, identity: Identity | None) -> None:
    """One token from the caller's bucket (the user's, else the client IP's); 429 when empty."""
    settings = request.app[settings_key]
    key = bucket_key(identity, client_ip(request, settings.server.trusted_proxies))
    decision = request.app[limiter_key].take_request(settings.limits, key)
    if decision is not None:
        request[ratelimit_key] = decision
        if not decision.allowed:
            raise refusal(decision)


def add_ratelimit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Part of the front door's response-headers hook: limited responses, streams and
    429s included, show the bucket."""
    if not is_limited(request):  # nothing was charged (and request.get's miss raises inside)
        return
    decision = request.get(ratelimit_key)
    if decision is not None:
        headers = response.headers
        headers[RATELIMIT_LIMIT] = str(decision.limit)
        headers[RATELIMIT_REMAINING] = str(decision.remaining)
        headers[RATELIMIT_RESET] = str(decision.reset)
