"""The serving process tree: database, migrations, the listening socket, the workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TypeVar

import asyncpg

from server import db
from server.embedded_pg import EmbeddedPostgres, mask_url
from server.settings import Settings
from server.users import UserStore, validate_new_user
from server.worker import run_worker

T = TypeVar("T")

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


async def with_user_store(settings: Settings, action: Callable[[UserStore], Awaitable[T]]) -> T:
    """Run one action against the users table outside the app (CLI, first start)."""
    await db.migrate(settings.database.url)
    pool = await asyncpg.create_pool(settings.database.url, min_size=1, max_size=2)
    try:
        return await action(UserStore(pool, settings.auth.bcrypt_rounds))
    finally:
        await pool.close()


async def bootstrap_admin(users: UserStore, environ: Mapping[str, str]) -> None:
    """First start: HERALD_ADMIN_USERNAME / _PASSWORD create an admin if there are no users."""
    username, password = environ.get("HERALD_ADMIN_USERNAME"), environ.get("HERALD_ADMIN_PASSWORD")
    if not username or not password or await users.count() > 0:
        return
    username, password, roles = validate_new_user(username, password, ["admin"])
    await users.create(username, password, roles)
    log.info("created the first admin %s", username)


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
        asyncio.run(with_user_store(settings, lambda users: bootstrap_admin(users, os.environ)))
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
