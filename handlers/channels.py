"""The channels a caller may follow, with live subscriber counts (PROTOCOL §4), and who is here (§14)."""

from __future__ import annotations

from aiohttp import web

from handlers.http import identity_of, json_response, query_int, require_identity
from server.errors import ValidationError
from server.identity.permissions import check_presence, is_valid_channel, may
from server.keys import presence_key, rules_key, store_key

SCAN_BATCH = 500


async def list_channels(request: web.Request) -> web.Response:
    identity = require_identity(request)
    limit = query_int(request, "limit", 100, 1, 1000)
    cursor = request.query.get("after", "")
    if cursor and not is_valid_channel(cursor):  # a NUL here was a 500 (PostgreSQL text refuses it)
        raise ValidationError.field("after", "must be a channel name: the previous page's next")
    rules, store = request.app[rules_key], request.app[store_key]
    found: list[tuple[str, int]] = []
    while len(found) < limit:
        batch = await store.channels_after(cursor, SCAN_BATCH)
        for name, last_offset in batch:
            cursor = name
            if may(identity, "subscribe", name, rules):
                found.append((name, last_offset))
                if len(found) == limit:
                    break
        if len(batch) < SCAN_BATCH:
            break
    counts = await request.app[presence_key].totals([name for name, _ in found])
    items = [{"name": name, "last_offset": last, "subscribers": counts[name]} for name, last in found]
    return json_response({"items": items, "next": found[-1][0] if len(found) == limit else None})


async def presence(request: web.Request) -> web.Response:
    channel = request.match_info["channel"]
    check_presence(identity_of(request), channel, request.app[rules_key])
    body = await request.app[presence_key].members(channel)
    return web.Response(body=body, content_type="application/json")
