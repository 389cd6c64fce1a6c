"""Every request gets an id: the caller's if well-formed, else a fresh UUID."""

from __future__ import annotations

import re
import uuid

from aiohttp import web

from server.keys import request_id_key
from server.ops.logs import request_id_var

VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_for(incoming: str | None) -> str:
    if incoming and VALID_REQUEST_ID.fullmatch(incoming):
        return incoming
    return str(uuid.uuid4())


@web.middleware
async def request_id_middleware(request: web.Request, handler):
    request_id = request_id_for(request.headers.get("X-Request-Id"))
    request[request_id_key] = request_id
    token = request_id_var.set(request_id)
    try:
        return await handler(request)
    finally:
        request_id_var.reset(token)


async def set_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: streamed responses (SSE, WebSocket, files) get the header too."""
    response.headers["X-Request-Id"] = request.get(request_id_key) or request_id_for(None)
