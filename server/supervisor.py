"""The serving process tree: database, migrations, the listening socket, the workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

from server import db
from server.embedded_pg import EmbeddedPostgres, mask_url
from server.settings import Settings
from server.worker import run_worker

log = logging.getLogger("herald.supervisor")


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[tuple[Settings, str]]:
    """Settings pointing at a usable database, and how to describe it in the logs.

    With no URL, a private PostgreSQL starts in data_dir and is stopped on the way out.
    """
    if settings.database.url:
        yield settings, f"external {mask_url(settings.database.url)}"
        return
    embedded = EmbeddedPostgres(settings.database.data_dir)
    try:
        url = asyncio.run(embedded.ensure_database())
        yield settings.replace("database", url=url), f"embedded PostgreSQL in {embedded.data_dir}"
    finally:
        embedded.stop()


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind once, before any worker exists, so every worker serves the same socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def serve(settings: Settings) -> int:
    with database(settings) as (settings, description):
        asyncio.run(db.migrate(settings.database.url))
        sock = bind_socket(settings.server.host, settings.server.port)
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        log.info(
            "Herald listening on %s with %d worker(s), database: %s",
            url,
            1,
            description,
            extra={"url": url, "workers": 1, "database": description},
        )
        run_worker(settings, sock)
    log.info("stopped")
    return 0
