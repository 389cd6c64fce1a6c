"""The dashboard and its assets (PROTOCOL §7): long caching for fingerprinted names, 304s."""

from __future__ import annotations

from aiohttp import web

from server.errors import NotFound
from server.keys import static_key

IMMUTABLE = "public, max-age=31536000, immutable"


def file_response(request: web.Request, name: str) -> web.FileResponse:
    found = request.app[static_key].lookup(name)
    if found is None:
        raise NotFound(f"No file {request.path}")
    path, immutable = found
    response = web.FileResponse(path, headers={"Cache-Control": IMMUTABLE if immutable else "no-cache"})
    if name.endswith(".html"):
        response.content_type = "text/html"
    return response


async def index(request: web.Request) -> web.FileResponse:
    return file_response(request, "index.html")


async def asset(request: web.Request) -> web.FileResponse:
    return file_response(request, request.match_info["name"])
