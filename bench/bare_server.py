"""The HTTP baseline: a bare aiohttp app answering a small JSON, nothing in front of it."""

from __future__ import annotations

import argparse

from aiohttp import web


async def small_json(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    for path in ("/healthz", "/readyz", "/api/me"):
        app.router.add_get(path, small_json)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
