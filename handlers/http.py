"""What every handler needs to read a request and write an answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import web

from server.errors import (
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    Unauthorized,
    UnsupportedMediaType,
    ValidationError,
)
from server.identity.auth import Identity
from server.keys import identity_key, limiter_key, refusals_log_key, settings_key
from server.limits.connections import Lease, Refused, open_connection
from server.web.json_depth import nests_deeper_than
from server.web.net import client_ip

INTEGER = re.compile(r"-?[0-9]+")
LONG_DIGITS = re.compile(r"[0-9]{19}")  # an integer orjson might not hold exactly (2**63 has 19 digits)
LONG_DIGITS_BYTES = re.compile(rb"[0-9]{19}")
INTEGER_DIGITS = 19  # every integer Herald takes fits in 19 digits; longer ones are out of range
CLOSE = {"Connection": "close"}  # the rest of a stalled body is not worth waiting for
CONNECTION_RETRY_AFTER = 5  # seconds: a connection cap frees up when one of the caller's own closes


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def decode_json(raw: bytes | str, max_depth: int) -> Any:
    """Standard JSON, exactly: integers of any size stay exact, and NaN/Infinity, which are
    not JSON, are refused. Nesting past `max_depth` (limits.json_depth) is refused before
    the recursive decoder sees it.

    orjson decodes an ordinary body in a fifth of the stdlib's time, but it turns an
    integer past 64 bits into a float: a body with 19 digits in a row (strings included),
    too many brackets for the quick depth count, or anything orjson refuses (with its
    own, terser message; UTF-16, a BOM and lone surrogates, which the stdlib takes)
    goes to the stdlib decoder, which answers as it always did.
    """
    if isinstance(raw, bytes):
        quick = raw.count(b"[") + raw.count(b"{") <= max_depth and LONG_DIGITS_BYTES.search(raw) is None
    else:
        quick = raw.count("[") + raw.count("{") <= max_depth and LONG_DIGITS.search(raw) is None
    if quick:
        with contextlib.suppress(orjson.JSONDecodeError):
            return orjson.loads(raw)
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass") if isinstance(raw, bytes) else raw
        if nests_deeper_than(text, max_depth):
            raise BadRequest(f"Malformed JSON: nested deeper than {max_depth} levels")
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: a last line of defence; the depth check above should make it unreachable.
        raise BadRequest(f"Malformed JSON: {type(exc).__name__ if isinstance(exc, RecursionError) else exc}") from None


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


async def read_json_object(request: web.Request, max_size: int | None = None) -> dict[str, Any]:
    """The body as a JSON object: 415 unless JSON, 413 over the limit, 400 unparseable, 422 not an object.

    `max_size` replaces the app's body limit for this request (the batch endpoints).
    """
    if request.content_type != "application/json":
        raise UnsupportedMediaType("Content-Type must be application/json")
    if max_size is not None:
        request = request.clone(client_max_size=max_size)
    limit = request.client_max_size
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Request body is larger than {limit} bytes")
    timeout = request.app[settings_key].server.body_timeout
    try:
        # A body sent a byte at a time holds no handler for long; one that has all arrived
        # (most, with their head) needs no timer.
        async with contextlib.nullcontext() if request.content.is_eof() else asyncio.timeout(timeout):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"Request body is larger than {limit} bytes") from None
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {timeout:g} s", headers=CLOSE) from None
    value = decode_json(raw, request.app[settings_key].limits.json_depth)
    if not isinstance(value, dict):
        raise ValidationError.field("body", "must be a JSON object")
    return value


async def expect_continue(request: web.Request) -> None:
    """Expect: 100-continue: say Continue only to a body that may be sent (RFC 9110 §10.1.1).

    An oversized Content-Length gets no 100: the handler answers 413 at once, without the
    client ever sending the body. Other expectations are ignored (RFC 9110 allows that),
    so no plain-text 417 escapes the problem-document path.
    """
    if request.version < (1, 1) or request.headers.get("Expect", "").lower() != "100-continue":
        return
    if request.content_length is not None and request.content_length > request.client_max_size:
        return
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the 100 is not the response: headers can still be sent


def query_int(request: web.Request, name: str, default: int | None, low: int, high: int) -> int | None:
    """An integer query parameter within [low, high]: 400 if it is not an integer at all (a
    malformed query, PROTOCOL §1), 422 naming it if it is one out of range (§4)."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not INTEGER.fullmatch(raw):  # int() also takes " 5", "+5", "1_0" and non-ASCII digits
        problem = {"field": name, "message": "must be an integer"}
        raise BadRequest(f"Query parameter {name} must be an integer", errors=[problem])
    value = int(raw) if len(raw.lstrip("-")) <= INTEGER_DIGITS else None
    if value is None or not low <= value <= high:
        raise ValidationError.field(name, f"must be between {low} and {high}")
    return value


def identity_of(request: web.Request) -> Identity | None:
    return request[identity_key]  # type: ignore[return-value]


def require_identity(request: web.Request) -> Identity:
    identity = identity_of(request)
    if identity is None:
        raise Unauthorized()
    return identity


def require_admin(request: web.Request) -> Identity:
    identity = require_identity(request)
    if not identity.is_admin:
        raise Forbidden("This needs the admin role")
    return identity


def page_params(request: web.Request) -> tuple[int | None, int]:
    """`after` (a previous page's `next`) and `limit` (1..1000, default 100) of a list."""
    limit = query_int(request, "limit", 100, 1, 1000)
    after = query_int(request, "after", None, 0, 2**62)
    return after, limit  # type: ignore[return-value]


@contextlib.contextmanager
def realtime_slot(request: web.Request, identity: Identity | None) -> Iterator[Lease]:
    """A WebSocket's or SSE stream's place under the per-address and per-identity caps, held
    while it is open; 429 before the upgrade when a cap is full (PROTOCOL §8's Retry-After)."""
    app = request.app
    settings = app[settings_key]
    ip = client_ip(request, settings.server.trusted_proxies)
    limits = settings.limits
    counts = app[limiter_key].connections
    lease = open_connection(
        counts, ip, identity.id if identity else None, limits.connections_per_ip, limits.connections_per_identity
    )
    if isinstance(lease, Refused):
        app[refusals_log_key].warning(
            f"connection cap per {lease.what}",
            "refused a connection: too many open",
            cap=lease.cap,
            per=lease.what,
            remote=ip,
        )
        raise RateLimited(
            f"Too many open connections for this {lease.what} (at most {lease.cap}); close one first",
            headers={"Retry-After": str(CONNECTION_RETRY_AFTER)},
        )
    try:
        yield lease
    finally:
        lease.release()
