"""run.py as an operator runs it (a real subprocess), and the migration machinery under it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from server.storage import db
from server.storage.embedded_pg import mask_url
from tests.conftest import PostgresServer, wait_for

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "run.py")]
# Where a child that wrongly got past its settings would fail fast, instead of starting
# an embedded PostgreSQL in the repository's var/.
UNREACHABLE_DATABASE = "postgresql://herald@127.0.0.1:9/unreachable"


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without any Herald settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_") and k != "DATABASE_URL"}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    # subprocess.run kills the child if the timeout expires.
    return subprocess.run(
        [*RUN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def write_settings(directory: Path, extra: str = "") -> Path:
    """A settings file that keeps everything the server writes inside `directory`."""
    path = directory / "settings.toml"
    path.write_text(
        f"[database]\ndata_dir = '{directory / 'pgdata'}'\npool_size = 2\n"
        f"[auth]\nbcrypt_rounds = 4\nsecrets_dir = '{directory / 'secrets'}'\n{extra}"
    )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def fetch(url: str, query: str) -> list[asyncpg.Record]:
    conn = await db.connect(url)
    try:
        return await conn.fetch(query)
    finally:
        await conn.close()


@pytest.fixture
async def fresh_database(postgres: PostgresServer) -> AsyncIterator[str]:
    """An empty database of its own on the session's PostgreSQL, dropped afterwards."""
    name = f"herald_cli_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(postgres.admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield postgres.url_for(name)
    finally:
        conn = await asyncpg.connect(postgres.admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def migration_names(directory: Path = db.MIGRATIONS_DIR) -> list[str]:
    return [f"{m.version:03d}_{m.name}" for m in db.load_migrations(directory)]


# --- (a) a bad setting: exit 2, one line naming the key ---------------------------------

ISSUER = '[[auth.issuers]]\nissuer = "https://app.example"\naudience = "herald"\nalgorithms = ["HS256"]\n'
ISSUER += 'id_prefix = "app:"\n'


@pytest.mark.parametrize(
    ("args", "environ", "content", "key"),
    [
        (["serve"], {"HERALD_SERVER_PORT": "99999"}, None, "server.port"),
        (["serve", "--port", "99999"], {}, None, "server.port"),
        (["--workers", "0"], {}, None, "server.workers"),
        (["serve"], {"HERALD_SERVER_PORTT": "8080"}, None, "HERALD_SERVER_PORTT"),
        (["serve", "--settings", "{file}"], {}, "[server]\nport = = 8080\n", "{file}"),
        (["serve", "--settings", "{file}"], {}, '[auth]\njwt_algorithm = "none"\n', "auth.jwt_algorithm"),
        ([], {"HERALD_SETTINGS": "{file}"}, "[limits]\nburst = -1\n", "limits.burst"),
        (["migrate", "--settings", "{file}"], {}, '[[channels]]\npublish = ["admin"]\n', "channels[0].pattern"),
        (["migrate", "--settings", "{file}"], {}, "[server]\ntrusted_proxies = ['proxy']\n", "server.trusted_proxies"),
        (["migrate", "--settings", "{file}"], {}, None, "{file}"),  # the file does not exist
        (["migrate"], {"DATABASE_URL": "mysql://u:p@h/db"}, None, "database.url"),
        (["migrate", "--settings", "{file}"], {}, ISSUER + 'secret = "too short"\n', "auth.issuers[0].secret"),
        (["migrate", "--settings", "{file}"], {}, ISSUER, "auth.issuers[0]"),  # no key at all
        (
            ["migrate", "--settings", "{file}"],
            {},
            ISSUER + f'secret = "{"k" * 32}"\nallowed_roles = ["publisher", "admin"]\n',
            "auth.issuers[0].allowed_roles",
        ),
    ],
)
def test_a_bad_setting_exits_2_with_one_line_naming_the_key(tmp_path, args, environ, content, key):
    path = tmp_path / "bad.toml"
    if content is not None:
        path.write_text(content)
    fill = {"file": str(path)}
    env = child_env(DATABASE_URL=UNREACHABLE_DATABASE)
    env.update({name: value.format(**fill) for name, value in environ.items()})
    result = run_cli(*(arg.format(**fill) for arg in args), env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert key.format(**fill) in lines[0]
    assert result.stdout == ""


# --- (b) migrate: applies every migration, then none ------------------------------------


async def test_migrate_applies_the_migrations_once_and_is_idempotent(fresh_database, tmp_path):
    settings = write_settings(tmp_path)
    env = child_env(DATABASE_URL=fresh_database)
    expected = migration_names()

    first = run_cli("migrate", "--settings", str(settings), env=env)
    assert first.returncode == 0, first.stderr
    assert f"{len(expected)} migration(s) applied" in first.stdout
    assert all(name in first.stdout for name in expected)
    assert "external" in first.stdout
    query = "SELECT version, name, applied_at FROM schema_migrations ORDER BY version"
    recorded = await fetch(fresh_database, query)
    assert [f"{r['version']:03d}_{r['name']}" for r in recorded] == expected

    second = run_cli("migrate", "--settings", str(settings), env=env)
    assert second.returncode == 0, second.stderr
    assert "0 migration(s) applied" in second.stdout
    assert await fetch(fresh_database, query) == recorded


# --- (c) serve: healthy, one JSON start-up line, SIGTERM exits 0 ------------------------


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{password}@{host}"))


async def test_serve_answers_health_logs_its_start_and_stops_cleanly_on_sigterm(postgres, fresh_database, tmp_path):
    await db.migrate(fresh_database)
    database_url = fresh_database
    if postgres.embedded is not None:
        # The embedded server trusts local connections, so any password works: give the
        # URL one to see it masked in the log.
        database_url = with_password(fresh_database, "s3cret-Pa55word")
    password = urlsplit(database_url).password
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    settings = write_settings(tmp_path, "[server]\nshutdown_timeout = 5\n")
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [*RUN, "serve", "--settings", str(settings), "--port", str(port), "--workers", "1"],
            cwd=ROOT,
            env=child_env(DATABASE_URL=database_url),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:

            async def healthy():
                if proc.poll() is not None:
                    raise AssertionError(f"run.py exited with {proc.returncode}:\n{stderr_path.read_text()}")
                try:
                    async with session.get(f"{url}healthz") as resp:
                        return resp.status == 200 and resp.headers.copy()
                except (TimeoutError, aiohttp.ClientError):
                    return False

            headers = await wait_for(healthy, timeout=20)
        assert headers.get("X-Request-Id")

        log_text = stderr_path.read_text()
        entries = [json.loads(line) for line in log_text.splitlines()]  # every stderr line is JSON
        startup = [line for line in log_text.splitlines() if url in line]
        assert len(startup) == 1, log_text
        entry = json.loads(startup[0])
        assert "database" in startup[0]
        assert "external" in startup[0]
        assert mask_url(database_url) in startup[0]
        assert entry.get("workers") == 1 or "1 worker" in entry["message"]
        assert entries
        if password:
            assert password not in log_text

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, stderr_path.read_text()
        for line in stderr_path.read_text().splitlines():
            json.loads(line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://herald:s3cret@db.example:5432/herald", "postgresql://herald:***@db.example:5432/herald"),
        ("postgresql://herald:p%40ss@db.example/herald", "postgresql://herald:***@db.example/herald"),
        ("postgres://same:same@h/same", "postgres://same:***@h/same"),
        ("postgresql://herald:herald@h/herald?sslmode=require", "postgresql://herald:***@h/herald?sslmode=require"),
        ("postgresql://postgres:@/herald?host=/tmp/pg", "postgresql://postgres:***@/herald?host=/tmp/pg"),
        ("postgresql://herald@db.example/herald", "postgresql://herald@db.example/herald"),
        ("postgresql:///herald?host=/tmp/pg", "postgresql:///herald?host=/tmp/pg"),
    ],
)
def test_mask_url_hides_the_password_only(url, masked):
    assert mask_url(url) == masked


# --- (d) migrations under concurrency ---------------------------------------------------

# Each of these fails if it runs twice, and 002 counts its runs.
NON_IDEMPOTENT = {
    "001_counter.sql": "CREATE TABLE counter (n integer NOT NULL); INSERT INTO counter VALUES (1);",
    "002_label.sql": "ALTER TABLE counter ADD COLUMN label text; UPDATE counter SET n = n + 1;",
    "003_index.sql": "CREATE INDEX counter_n ON counter (n);",
}


def write_migrations(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


@pytest.mark.parametrize("which", ["shipped", "non-idempotent"])
async def test_concurrent_migrators_apply_each_migration_once(fresh_database, tmp_path, which):
    directory = db.MIGRATIONS_DIR
    if which == "non-idempotent":
        directory = write_migrations(tmp_path / "migrations", NON_IDEMPOTENT)
    expected = migration_names(directory)

    results = await asyncio.gather(*(db.migrate(fresh_database, directory) for _ in range(4)))

    assert sorted(name for applied in results for name in applied) == expected
    rows = await fetch(fresh_database, "SELECT version, count(*) AS n FROM schema_migrations GROUP BY version")
    assert sorted(r["version"] for r in rows) == [m.version for m in db.load_migrations(directory)]
    assert all(r["n"] == 1 for r in rows)
    if which == "non-idempotent":
        assert [tuple(r) for r in await fetch(fresh_database, "SELECT n, label FROM counter")] == [(2, None)]
    assert await db.migrate(fresh_database, directory) == []


async def test_a_failing_migration_is_rolled_back_and_retried_next_time(fresh_database, tmp_path):
    files = {"001_ok.sql": "CREATE TABLE ok (id int);", "002_broken.sql": "CREATE TABLE half (id int); SELECT 1/0;"}
    directory = write_migrations(tmp_path / "migrations", files)
    with pytest.raises(asyncpg.DivisionByZeroError):
        await db.migrate(fresh_database, directory)
    assert [r["version"] for r in await fetch(fresh_database, "SELECT version FROM schema_migrations")] == [1]
    assert await fetch(fresh_database, "SELECT to_regclass('half') AS t") == [(None,)]

    (directory / "002_broken.sql").write_text("CREATE TABLE half (id int);")
    assert await db.migrate(fresh_database, directory) == ["002_broken"]


# --- (e) migration files ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["init.sql", "1-init.sql", "001_.sql", "001_create-users.sql", "v001_init.sql"])
def test_load_migrations_rejects_a_badly_named_file(tmp_path, name):
    write_migrations(tmp_path, {"000_ok.sql": "SELECT 1;", name: "SELECT 1;"})
    with pytest.raises(ValueError, match=name):
        db.load_migrations(tmp_path)


def test_load_migrations_rejects_two_files_with_one_version(tmp_path):
    write_migrations(tmp_path, {"001_users.sql": "SELECT 1;", "1_channels.sql": "SELECT 2;"})
    with pytest.raises(ValueError, match="version"):
        db.load_migrations(tmp_path)


def test_load_migrations_reads_sql_files_in_version_order(tmp_path):
    write_migrations(tmp_path, {"002_b.sql": "SELECT 2;", "001_a.sql": "SELECT 1;", "README.md": "not a migration"})
    assert [(m.version, m.name, m.sql) for m in db.load_migrations(tmp_path)] == [
        (1, "a", "SELECT 1;"),
        (2, "b", "SELECT 2;"),
    ]


def test_the_shipped_migrations_load():
    versions = [m.version for m in db.load_migrations()]
    assert versions == sorted(set(versions))
