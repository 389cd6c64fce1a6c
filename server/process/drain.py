"""A retiring worker's last moments: no request that reached it is cut.

On SIGTERM (a shutdown, or a SIGHUP roll replacing this worker) aiohttp alone stops
accepting and at once closes every idle keep-alive connection, racing the clients that
are sending their next request on one: those requests were cut (ClientOSError,
ServerDisconnected). Instead, once draining, every response says `Connection: close`,
so each keep-alive client takes its next request to a fresh connection (another worker);
connections still open get a grace to bring their next request, and only then are the
idle ones closed (between requests) while those in flight finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import hdrs, web

DRAIN_GRACE = 2.0  # seconds at most that open keep-alive connections get to leave by themselves
POLL = 0.02


class Drain:
    """Whether this worker is retiring; the app's response hook (middlewares/front_door.py)
    then makes every answer the last one on its connection."""

    def __init__(self) -> None:
        self.active = False

    @staticmethod
    def last_response(response: web.StreamResponse) -> None:
        response.force_close()  # aiohttp closes the connection after this response
        response.headers[hdrs.CONNECTION] = "close"  # and the client knows (headers are built already)


async def drain(runner: web.BaseRunner, state: Drain, streams: Callable[[], int], grace: float) -> None:
    """Stop accepting, then wait until the only connections left are real-time streams
    (closed by on_shutdown next) or the grace is over."""
    state.active = True
    for site in list(runner.sites):
        await site.stop()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while loop.time() < deadline:
        server = runner.server
        if server is None or len(server.connections) <= streams():
            return
        await asyncio.sleep(POLL)
