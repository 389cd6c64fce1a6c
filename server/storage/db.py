"""The PostgreSQL pool (a cleanup context) and the numbered SQL migrations."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
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
)


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
