"""The PostgreSQL pool (a cleanup context) and the numbered SQL migrations."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from aiohttp import web

from server.keys import pool_key, settings_key

log = logging.getLogger("herald.db")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
MIGRATION_LOCK = 0x4845_5241_4C44  # "HERALD": one migrator at a time across processes and hosts

# What asyncpg raises when the database is unreachable or going away: a 503, not a 500.
DATABASE_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.InterfaceError,
    # Seen while a connection went back to the pool during a restart ("cannot switch to
    # state 15; another operation is in progress"): the connection is broken, not the request.
    asyncpg.InternalClientError,
)


def is_storable_text(value: str) -> bool:
    """Whether PostgreSQL can hold this string in a `text` column: no NUL (PostgreSQL refuses
    it) and no lone surrogate (it has no UTF-8 form). Client text failing this is refused, not a 500."""
    if "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


@asynccontextmanager
async def committed_connection(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection whose return to the pool cannot fail the caller.

    Whatever the block committed stays committed if the connection breaks afterwards (a
    database restarting while the pool resets it): the caller must answer with what it
    stored, or a client retrying the "failed" request would store it twice. The pool
    terminates a connection whose reset failed, so nothing broken is reused.
    """
    conn = await pool.acquire()
    try:
        yield conn
    finally:
        try:
            await pool.release(conn)
        except DATABASE_DOWN_ERRORS as exc:
            log.warning("a connection broke on its way back to the pool: %s", type(exc).__name__)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = re.fullmatch(r"(\d+)_(\w+)\.sql", path.name)
        if not match:
            raise ValueError(f"migration file name must be NNN_name.sql: {path.name}")
        migrations.append(Migration(int(match[1]), match[2], path.read_text()))
    migrations.sort(key=lambda m: m.version)
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise ValueError("two migrations share a version number")
    return migrations


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations, each in its own transaction; returns the names applied.

    An advisory lock makes concurrent callers (workers, hosts) take turns, and each
    re-reads what is applied once it holds the lock, so every migration runs once.
    """
    migrations = load_migrations(directory)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
            applied = []
            for migration in migrations:
                if migration.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
                applied.append(f"{migration.version:03d}_{migration.name}")
                log.info("migration applied", extra={"migration": applied[-1]})
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    finally:
        await conn.close()


async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key]
    pool = await asyncpg.create_pool(
        settings.database.url,
        min_size=1,
        max_size=settings.database.pool_size,
        command_timeout=30,
        # A restarted database leaves dead connections behind; recycle idle ones.
        max_inactive_connection_lifetime=60,
    )
    app[pool_key] = pool
    try:
        yield
    finally:
        await asyncio.wait_for(pool.close(), timeout=10)


async def database_ready(pool: asyncpg.Pool, deadline: float = 2.0) -> bool:
    try:
        async with asyncio.timeout(deadline):
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
        return True
    except DATABASE_DOWN_ERRORS:
        return False
