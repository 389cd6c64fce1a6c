"""`run.py createuser` as an operator runs it, and the first-start admin (PROTOCOL §9)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import bcrypt
import pytest

from server.errors import ValidationError
from server.identity.users import UserStore
from server.process.supervisor import bootstrap_admin
from server.storage import db

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret password"


async def createuser(database_url: str, *args: str, stdin: str) -> tuple[int, str, str]:
    """Run `run.py createuser ARGS` in a child with only DATABASE_URL (and fast bcrypt) set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_") and k != "DATABASE_URL"}
    env |= {"DATABASE_URL": database_url, "HERALD_AUTH_BCRYPT_ROUNDS": "4"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "run.py"),
        "createuser",
        *args,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout=30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


async def fetch_users(database_url: str) -> list[asyncpg.Record]:
    conn = await db.connect(database_url)
    try:
        return await conn.fetch("SELECT username, roles, password_hash, disabled FROM users ORDER BY id")
    finally:
        await conn.close()


@pytest.fixture
async def users(settings, database_url) -> AsyncIterator[UserStore]:
    """A UserStore on an empty users table (the `settings` fixture truncates)."""
    pool = await db.create_pool(database_url, min_size=1, max_size=2)
    try:
        yield UserStore(pool, settings.auth.bcrypt_rounds)
    finally:
        await pool.close()


async def test_createuser_with_roles_and_password_from_stdin(settings, database_url):
    status, out, err = await createuser(
        database_url, "carol", "--role", "admin", "--role", "publisher", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert status == 0, err
    assert "carol" in out
    [row] = await fetch_users(database_url)
    assert row["username"] == "carol"
    assert list(row["roles"]) == ["admin", "publisher"]
    assert row["disabled"] is False
    assert row["password_hash"].startswith("$2b$04$")
    assert bcrypt.checkpw(PASSWORD.encode(), row["password_hash"].encode())  # the newline is not part of it
    assert PASSWORD not in out + err


@pytest.mark.parametrize(
    ("args", "stdin", "named"),
    [
        (("dave",), "short\n", "password"),
        (("dave",), "\n", "password"),
        (("dave",), "", "password"),
        (("dave",), "a" * 73 + "\n", "password"),
        (("bad name",), PASSWORD + "\n", "username"),
        (("dave", "--role", "owner"), PASSWORD + "\n", "roles"),
    ],
)
async def test_createuser_refuses_bad_input_with_exit_2_and_one_line(settings, database_url, args, stdin, named):
    status, out, err = await createuser(database_url, *args, "--password-stdin", stdin=stdin)
    assert status == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("herald: ")
    assert named in lines[0]
    assert "Traceback" not in err
    assert await fetch_users(database_url) == []


async def test_createuser_with_a_taken_name_exits_1(settings, database_url, users):
    await users.create("Carol", "another password", ())
    status, _, err = await createuser(database_url, "carol", "--role", "admin", "--password-stdin", stdin=PASSWORD)
    assert status == 1, err
    assert "Traceback" not in err
    assert "taken" in err.strip().splitlines()[-1]
    [row] = await fetch_users(database_url)
    assert (row["username"], list(row["roles"])) == ("Carol", [])


BOOTSTRAP = {"HERALD_ADMIN_USERNAME": "boss", "HERALD_ADMIN_PASSWORD": PASSWORD}


async def test_bootstrap_creates_the_first_admin(users):
    await bootstrap_admin(users, BOOTSTRAP)
    [row] = await users.pool.fetch("SELECT username, roles, password_hash FROM users")
    assert (row["username"], list(row["roles"])) == ("boss", ["admin"])
    assert row["password_hash"].startswith("$2b$")
    user = await users.authenticate("boss", PASSWORD)
    assert user is not None
    assert user.roles == ("admin",)
    # A second start finds a user and leaves everything alone.
    await bootstrap_admin(users, BOOTSTRAP | {"HERALD_ADMIN_USERNAME": "other"})
    assert await users.count() == 1


async def test_instances_starting_together_create_the_admin_once_and_none_fails(users):
    """Two instances on one empty database both see no user; the loser must not crash."""
    await asyncio.gather(*(bootstrap_admin(users, BOOTSTRAP) for _ in range(4)))
    rows = await users.pool.fetch("SELECT username FROM users")
    assert [r["username"] for r in rows] == ["boss"]


async def test_bootstrap_does_nothing_when_a_user_exists(users):
    await users.create("someone", "another password", ("subscriber",))
    await bootstrap_admin(users, BOOTSTRAP)
    rows = await users.pool.fetch("SELECT username, roles FROM users")
    assert [(r["username"], list(r["roles"])) for r in rows] == [("someone", ["subscriber"])]


@pytest.mark.parametrize(
    "environ",
    [
        {"HERALD_ADMIN_USERNAME": "boss"},
        {"HERALD_ADMIN_PASSWORD": PASSWORD},
        {"HERALD_ADMIN_USERNAME": "", "HERALD_ADMIN_PASSWORD": PASSWORD},
        {"HERALD_ADMIN_USERNAME": "boss", "HERALD_ADMIN_PASSWORD": ""},
    ],
)
async def test_bootstrap_does_nothing_with_only_one_variable(users, environ):
    await bootstrap_admin(users, environ)
    assert await users.count() == 0


@pytest.mark.parametrize("environ", [{}, {"ADMIN_USERNAME": "boss", "ADMIN_PASSWORD": PASSWORD}])
async def test_a_first_start_without_variables_creates_admin_with_a_random_password_shown_once(users, environ):
    """Issue 10: the README's first command must start a server someone can sign in to."""
    shown: list[tuple[str, str]] = []
    await bootstrap_admin(users, environ, announce=lambda *pair: shown.append(pair))
    [(username, password)] = shown
    assert username == "admin"
    assert len(password) >= 20
    user = await users.authenticate("admin", password)
    assert user is not None
    assert user.roles == ("admin",)
    await bootstrap_admin(users, environ, announce=lambda *pair: shown.append(pair))
    assert len(shown) == 1  # never again
    assert await users.count() == 1


async def test_the_generated_password_is_one_line_on_stderr_and_not_in_the_logs(users, capsys, caplog):
    await bootstrap_admin(users, {})
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if "first start" in line]
    entry = json.loads(line)  # stderr stays JSON lines (PROTOCOL §7)
    assert (entry["level"], entry["logger"]) == ("warning", "herald.first_start")
    message = entry["message"]
    assert message.startswith("*")
    assert message.endswith("*")
    password = message.split("with password ")[1].split("'")[1]
    assert await users.authenticate("admin", password) is not None
    assert password not in caplog.text  # not through logging


async def test_bootstrap_validates_like_any_new_user(users):
    with pytest.raises(ValidationError) as info:
        await bootstrap_admin(users, {"HERALD_ADMIN_USERNAME": "boss", "HERALD_ADMIN_PASSWORD": "short"})
    assert info.value.errors[0]["field"] == "password"
    assert await users.count() == 0
