"""Publishing and history (PROTOCOL §4)."""

from __future__ import annotations

from aiohttp import web

from handlers.http import identity_of, query_int, read_json_object
from server.events.store import StoredEvent, validate_event, validate_idempotency_key
from server.identity.permissions import check_permission
from server.keys import rules_key, store_key


def raw_json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def event_page(events: list[StoredEvent], limit: int) -> bytes:
    """A history page from the stored JSON texts, without decoding them."""
    next_offset = str(events[-1].offset).encode() if len(events) == limit else b"null"
    return b'{"items":[' + b",".join(e.json.encode() for e in events) + b'],"next":' + next_offset + b"}"


async def publish(request: web.Request) -> web.Response:
    channel = request.match_info["channel"]
    check_permission(identity_of(request), "publish", channel, request.app[rules_key])
    event_type, data = validate_event(await read_json_object(request))
    key = validate_idempotency_key(request.headers.get("Idempotency-Key"))
    event, created = await request.app[store_key].publish(channel, event_type, data, key)
    return raw_json_response(event.json.encode(), status=201 if created else 200)


async def history(request: web.Request) -> web.Response:
    channel = request.match_info["channel"]
    check_permission(identity_of(request), "subscribe", channel, request.app[rules_key])
    after = query_int(request, "after", 0, 0, 2**62)
    limit = query_int(request, "limit", 100, 1, 1000)
    events = await request.app[store_key].history(channel, after, limit)
    return raw_json_response(event_page(events, limit))
