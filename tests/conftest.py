"""The test bed: one real PostgreSQL per test session, a clean database per test.

With DATABASE_URL set, that server is used (a private database is created on it and
dropped at the end); without it, pgserver starts a private PostgreSQL in a temp dir.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from server.settings import Settings, build_settings
from server.storage import db
from server.storage.embedded_pg import EmbeddedPostgres

TEST_CHANNEL_RULES = [
    {"pattern": "public:*", "subscribe": ["anonymous"], "publish": ["publisher"]},
    {"pattern": "user:{sub}", "subscribe": ["owner"], "publish": ["publisher"]},
    {"pattern": "secret:*", "subscribe": ["admin"], "publish": ["admin"]},
    {"pattern": "*", "subscribe": ["authenticated"], "publish": ["publisher"]},
]


def url_with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@dataclass
class PostgresServer:
    admin_url: str
    embedded: EmbeddedPostgres | None

    def url_for(self, database: str) -> str:
        if self.embedded is not None:
            return self.embedded.url(database)
        return url_with_database(self.admin_url, database)

    def require_embedded(self) -> EmbeddedPostgres:
        if self.embedded is None:
            pytest.skip("stopping the database needs the embedded PostgreSQL (DATABASE_URL is set)")
        return self.embedded

    def stop(self) -> None:
        self.require_embedded().pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        embedded = self.require_embedded()
        socket_dir = str(embedded.data_dir)
        embedded.pg_ctl("-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(embedded.data_dir / "log"), "start")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield PostgresServer(admin_url=url, embedded=None)
        return
    # Not under pytest's tmp dir: pgserver opens the parent dirs to its own system user
    # (when run as root), and each new pytest session closes /tmp/pytest-of-<user> again.
    parent = tempfile.mkdtemp(prefix="herald-pg-")
    embedded = EmbeddedPostgres(os.path.join(parent, "data"))
    try:
        yield PostgresServer(admin_url=embedded.url("postgres"), embedded=embedded)
    finally:
        embedded.stop()
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(postgres: PostgresServer) -> Iterator[str]:
    name = f"herald_test_{os.getpid()}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(postgres.admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = postgres.url_for(name)
    asyncio.run(db.migrate(url))
    yield url
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def truncate_all(url: str, schema: str = db.DEFAULT_SCHEMA) -> None:
    """Empty Herald's tables (those of its schema, database.schema), keeping the migrations."""
    conn = await db.connect(url, schema)
    try:
        tables = await conn.fetch(
            "SELECT quote_ident(tablename) AS t FROM pg_tables "
            "WHERE schemaname = $1 AND tablename <> 'schema_migrations'",
            schema,
        )
        if tables:
            await conn.execute(f"TRUNCATE {', '.join(r['t'] for r in tables)} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


@pytest.fixture
def make_settings(database_url: str, tmp_path) -> Callable[..., Settings]:
    """Settings for a test app: the test database, fast bcrypt, secrets in a temp dir."""
    base = {
        "database": {"url": database_url, "pool_size": 4},
        "server": {"static_build_dir": str(tmp_path / "static-build")},
        "auth": {"bcrypt_rounds": 4, "secrets_dir": str(tmp_path / "secrets")},
        "events": {"prune_interval": 1},
        # Generous limits: tests of the limits themselves set their own.
        "limits": {"rate": 100000, "burst": 100000, "login_rate": 100000, "login_ip_rate": 100000},
        "channels": TEST_CHANNEL_RULES,
    }

    def make(raw: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Settings:
        return build_settings(deep_merge(base, raw or {}), environ or {})

    return make


@pytest.fixture
async def settings(make_settings, database_url: str) -> Settings:
    await truncate_all(database_url)
    return make_settings()


@pytest.fixture
async def make_client(aiohttp_client, make_settings, settings):
    """A test client for an app with these settings (requesting `settings` truncates the tables)."""
    from server.app import create_app

    async def make(raw: dict[str, Any] | None = None):
        return await aiohttp_client(create_app(make_settings(raw)))

    return make


@pytest.fixture
async def client(aiohttp_client, settings: Settings):
    from server.app import create_app

    return await aiohttp_client(create_app(settings))


async def wait_for(condition: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, interval: float = 0.05):
    """Poll until condition() is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
