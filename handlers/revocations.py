"""POST /api/revocations (PROTOCOL §13): refuse an identity's tokens issued up to now."""

from __future__ import annotations

from aiohttp import web

from handlers.http import read_json_object, require_admin
from server.errors import ValidationError
from server.identity.revocations import MAX_IDENTITY_ID
from server.keys import revocations_key


async def revoke(request: web.Request) -> web.Response:
    require_admin(request)
    body = await read_json_object(request)
    identity_id = body.get("id")
    if not isinstance(identity_id, str) or not 0 < len(identity_id) <= MAX_IDENTITY_ID or not identity_id.isprintable():
        raise ValidationError.field("id", f"must be an identity id: 1 to {MAX_IDENTITY_ID} printable characters")
    await request.app[revocations_key].revoke(identity_id)
    return web.Response(status=204)
