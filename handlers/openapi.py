"""GET /api/openapi.json: the REST API described in OpenAPI 3.1 (server/web/openapi.json)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

DOCUMENT_PATH = Path(__file__).resolve().parent.parent / "server" / "web" / "openapi.json"

Handler = Callable[[web.Request], Awaitable[web.Response]]


def read_document(path: Path) -> bytes:
    """The document's bytes as written (readable, hand-maintained), checked once: a broken
    file stops the app from being built instead of failing a request later."""
    body = path.read_bytes()
    document = json.loads(body)
    if not isinstance(document, dict) or not str(document.get("openapi", "")).startswith("3.1"):
        raise ValueError(f"{path} is not an OpenAPI 3.1 document")
    return body


def document_handler(path: Path | None = None) -> Handler:
    """The route's handler, holding the document read now, while the app is built: no file
    is read on the event loop at request time."""
    body = read_document(path or DOCUMENT_PATH)

    async def document(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return document
