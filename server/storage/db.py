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
DEFAULT_SCHEMA = "herald"

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


def server_settings(schema: str) -> dict[str, str]:
    """Session settings of every Herald connection: its own schema first, whatever the role's default.

    pg_temp last, so no temporary object shadows Herald's tables or functions (the SECURITY
    DEFINER functions pin this same path when the migrations create them).
    """
    return {"search_path": f'"{schema}", pg_temp'}


async def connect(dsn: str, schema: str = DEFAULT_SCHEMA) -> asyncpg.Connection:
    """One connection outside the pool (migrations, LISTEN), with Herald's search_path."""
    return await asyncpg.connect(dsn, server_settings=server_settings(schema))


async def create_pool(dsn: str, schema: str = DEFAULT_SCHEMA, **kwargs) -> asyncpg.Pool:
    return await asyncpg.create_pool(dsn, server_settings=server_settings(schema), **kwargs)


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


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR, schema: str = DEFAULT_SCHEMA) -> list[str]:
    """Apply pending migrations, each in its own transaction; returns the names applied.

    An advisory lock makes concurrent callers (workers, hosts) take turns, and each
    re-reads what is applied once it holds the lock, so every migration runs once.
    Migrations run in `schema` (created here): they name tables unqualified.
    """
    migrations = load_migrations(directory)
    conn = await connect(dsn, schema)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await adopt_legacy_layout(conn, schema)
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
            if applied:
                # Whatever a migration created, no function of Herald's is anyone's to call
                # unless a migration granted it by name (the publisher role's two functions).
                await conn.execute(f'REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA "{schema}" FROM PUBLIC')
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    finally:
        await conn.close()


async def adopt_legacy_layout(conn: asyncpg.Connection, schema: str) -> None:
    """A database from before the schema move keeps its migration record in public: bring it along.

    Migration 003 then moves the tables themselves, with their rows, sequences and indexes.
    Only a public.schema_migrations that records Herald's first migration is taken.
    """
    if schema == "public" or await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        return
    legacy = await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = 'public' AND tablename = 'schema_migrations')"""
    )
    if legacy and await conn.fetchval("SELECT EXISTS (SELECT 1 FROM public.schema_migrations WHERE name = 'users')"):
        await conn.execute(f'ALTER TABLE public.schema_migrations SET SCHEMA "{schema}"')
        log.info("carrying a database without a schema over", extra={"schema": schema})


async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key]
    pool = await create_pool(
        settings.database.url,
        settings.database.schema,
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
