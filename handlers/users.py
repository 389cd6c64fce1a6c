"""User administration (PROTOCOL §2): admins only."""

from __future__ import annotations

from aiohttp import web

from handlers.http import json_response, page_params, read_json_object, require_admin
from server.errors import NotFound, ValidationError
from server.identity.users import validate_new_user
from server.keys import users_key


def user_id_from(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:  # "²".isdigit(), "٤٢".isdigit() too
        raise NotFound(f"No user {raw}")
    return int(raw)


async def create_user(request: web.Request) -> web.Response:
    require_admin(request)
    body = await read_json_object(request)
    username, password, roles = validate_new_user(body.get("username"), body.get("password"), body.get("roles"))
    user = await request.app[users_key].create(username, password, roles)
    return json_response(user.public(), status=201)


async def list_users(request: web.Request) -> web.Response:
    require_admin(request)
    after, limit = page_params(request)
    users = await request.app[users_key].page(after, limit)
    next_cursor = str(users[-1].id) if len(users) == limit else None
    return json_response({"items": [u.public() for u in users], "next": next_cursor})


async def update_user(request: web.Request) -> web.Response:
    require_admin(request)
    body = await read_json_object(request)
    disabled = body.get("disabled")
    if disabled is not None and not isinstance(disabled, bool):
        raise ValidationError.field("disabled", "must be true or false")
    roles = None
    if "roles" in body:
        if not isinstance(body["roles"], list):
            raise ValidationError.field("roles", "must be a list of role names")
        _, _, roles = validate_new_user("placeholder", "placeholder", body["roles"])
    user = await request.app[users_key].update(user_id_from(request), disabled=disabled, roles=roles)
    if user is None:
        raise NotFound(f"No user {request.match_info['id']}")
    return json_response(user.public())


async def delete_user(request: web.Request) -> web.Response:
    require_admin(request)
    if not await request.app[users_key].delete(user_id_from(request)):
        raise NotFound(f"No user {request.match_info['id']}")
    return web.Response(status=204)
