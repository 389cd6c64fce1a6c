"""One serving process: its own event loop (uvloop when installed) and app on a socket."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import warnings
from collections.abc import Callable

from aiohttp import web

from server.app import create_app
from server.keys import drain_key, hub_key
from server.limits.limiter import RateLimiter
from server.process.drain import DRAIN_GRACE, drain
from server.settings import Settings
from server.web.protocol import HeraldRunner

log = logging.getLogger("herald.worker")


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def serve_app(
    app: web.Application,
    sock: socket.socket,
    shutdown_timeout: float,
    on_ready: Callable[[], object] = lambda: None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop`, for tests), then drain: stop accepting, let
    keep-alive clients leave between requests (server/process/drain.py), on_shutdown,
    finish in-flight."""
    runner = HeraldRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    try:
        await web.SockSite(runner, sock).start()
        on_ready()
        await stop.wait()
        log.info("draining")
        hub = app[hub_key]
        await drain(runner, app[drain_key], lambda: len(hub.connections), min(DRAIN_GRACE, shutdown_timeout))
    finally:
        await runner.cleanup()


def run_worker(
    settings: Settings,
    sock: socket.socket,
    limiter: RateLimiter | None = None,
    on_ready: Callable[[], object] = lambda: None,
) -> None:
    install_uvloop()
    warnings.filterwarnings("ignore", category=web.NotAppKeyWarning, module="aiohttp_session")
    app = create_app(settings, limiter=limiter)
    asyncio.run(serve_app(app, sock, settings.server.shutdown_timeout, on_ready))
