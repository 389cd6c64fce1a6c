"""The channels a caller may follow, with live subscriber counts (PROTOCOL §4), and who is here (§14)."""

from __future__ import annotations

from aiohttp import web

from handlers.http import identity_of, json_response, query_int, require_identity
from server.errors import ValidationError
from server.identity.permissions import check_presence, is_valid_channel, may, subscribable_sql
from server.keys import presence_key, rules_key, settings_key, store_key

SCAN_LIMIT = 5000  # channel rows one call looks at, at most: a short page with a `next` goes on from there


async def list_channels(request: web.Request) -> web.Response:
    identity = require_identity(request)
    limit = query_int(request, "limit", 100, 1, 1000)
    cursor = request.query.get("after", "")
    if cursor and not is_valid_channel(cursor):  # a NUL here was a 500 (PostgreSQL text refuses it)
        raise ValidationError.field("after", "must be a channel name: the previous page's next")
    rules = request.app[rules_key]
    prefixes = [issuer.id_prefix for issuer in request.app[settings_key].auth.issuers]
    allowed_sql, params = subscribable_sql(identity, rules, first_param=4, id_prefixes=prefixes)
    if identity.grants is None or identity.is_admin:
        found, next_cursor = await request.app[store_key].channels_page(cursor, limit, allowed_sql, params, SCAN_LIMIT)
    else:  # a token's grants are checked here, over the same bounded scan
        found, next_cursor = await request.app[store_key].channels_page(cursor, SCAN_LIMIT, "true", [], SCAN_LIMIT)
        found = [(name, last) for name, last in found if may(identity, "subscribe", name, rules)]
        if len(found) >= limit:
            found, next_cursor = found[:limit], found[limit - 1][0]
    counts = await request.app[presence_key].totals([name for name, _ in found])
    items = [{"name": name, "last_offset": last, "subscribers": counts[name]} for name, last in found]
    return json_response({"items": items, "next": next_cursor})


async def presence(request: web.Request) -> web.Response:
    channel = request.match_info["channel"]
    check_presence(identity_of(request), channel, request.app[rules_key])
    body = await request.app[presence_key].members(channel)
    return web.Response(body=body, content_type="application/json")
