"""Publishing from SQL inside the application's own transaction (PROTOCOL §12, issue 13).

The application here is what it would be in production: its own schema and table, and
a login role of its own that was granted herald_publisher, nothing more. Two app
instances on one database stand for two workers (each has its own pool and LISTEN
connection, which is what makes a worker hear another process's commits).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import orjson
import pytest

from server.app import create_app
from server.keys import pool_key
from server.settings import SettingsError
from server.storage import db
from tests.helpers import SseClient, WsClient, bearer, publish, token_for

LEGACY_MIGRATIONS = Path(__file__).with_name("fixtures") / "legacy_migrations"
APP_ROLE = f"herald_test_app_{os.getpid()}"
APP_PASSWORD = "app role password"
INVALID_PARAMETER_VALUE = "22023"


async def admin_execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def app_role(database_url: str) -> str:
    """A login role of the application's, granted herald_publisher, owning the schema `shop`.

    Roles belong to the cluster and outlive the test database: dropped at the end.
    """
    asyncio.run(
        admin_execute(
            database_url,
            f"""DO $$ BEGIN
                    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
                        CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{APP_PASSWORD}';
                    END IF;
                END $$""",
            f"GRANT herald_publisher TO {APP_ROLE}",
            f"CREATE SCHEMA IF NOT EXISTS shop AUTHORIZATION {APP_ROLE}",
        )
    )
    yield APP_ROLE
    asyncio.run(admin_execute(database_url, f"DROP OWNED BY {APP_ROLE} CASCADE", f"DROP ROLE {APP_ROLE}"))


@pytest.fixture
async def shop(app_role: str, database_url: str, settings) -> AsyncIterator[asyncpg.Pool]:
    """A pool of the application's role (its default search_path), with a fresh shop.orders."""
    pool = await asyncpg.create_pool(database_url, user=app_role, password=APP_PASSWORD, min_size=1, max_size=8)
    try:
        await pool.execute("DROP TABLE IF EXISTS shop.orders")
        await pool.execute("CREATE TABLE shop.orders (id serial PRIMARY KEY, item text NOT NULL, qty int NOT NULL)")
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def pub(client) -> str:
    return await token_for(client, "pub", ("publisher",))


async def history(client, channel: str) -> list[dict]:
    resp = await client.get(f"/api/channels/{channel}/events?limit=1000")
    assert resp.status == 200, await resp.text()
    return (await resp.json())["items"]


async def sql_publish(conn: asyncpg.Connection, channel: str, type_: str | None, data: object) -> int:
    return await conn.fetchval("SELECT herald.publish($1, $2, $3::jsonb)", channel, type_, orjson.dumps(data).decode())


# ------------------------------------------------------------ commit, rollback, savepoint


async def test_a_committed_transaction_delivers_to_ws_and_sse_on_both_workers_and_into_history(
    client, make_client, shop, pub
):
    other = await make_client()
    channel = "public:orders"
    subscribers = []
    for c in (client, other):
        ws = await WsClient.connect(c)
        await ws.subscribe(channel)
        await ws.subscribe("public:marker")
        sse = await SseClient.connect(c, f"channel={channel}&channel=public:marker")
        subscribers += [ws, sse]

    async with shop.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("INSERT INTO shop.orders (item, qty) VALUES ('tea', 2)")
        assert await sql_publish(conn, channel, "order.created", {"id": 1, "item": "tea"}) == 1
        # Committed after the call but before the commit: it must arrive first, alone.
        await publish(client, pub, "public:marker", "before commit")
        for subscriber in subscribers:
            (event,) = await subscriber.events(1)
            assert event["channel"] == "public:marker", event
        await tx.commit()

    for subscriber in subscribers:
        (event,) = await subscriber.events(1)
        assert (event["channel"], event["offset"], event["type"]) == (channel, 1, "order.created")
        assert event["data"] == {"id": 1, "item": "tea"}
    (stored,) = await history(other, channel)
    assert {k: stored[k] for k in ("channel", "offset", "type", "data")} == {
        "channel": channel,
        "offset": 1,
        "type": "order.created",
        "data": {"id": 1, "item": "tea"},
    }


async def test_a_rolled_back_transaction_delivers_nothing_and_leaves_no_gap(client, shop, pub):
    ws = await WsClient.connect(client)
    await ws.subscribe("public:orders")
    async with shop.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("INSERT INTO shop.orders (item, qty) VALUES ('tea', 2)")
        assert await sql_publish(conn, "public:orders", "order.created", {"id": 1}) == 1
        await tx.rollback()
        assert await conn.fetchval("SELECT count(*) FROM shop.orders") == 0

    await publish(client, pub, "public:orders", "after")
    (event,) = await ws.events(1)
    assert (event["offset"], event["data"]) == (1, "after")
    assert [e["offset"] for e in await history(client, "public:orders")] == [1]


async def test_a_rollback_to_a_savepoint_before_the_call_leaves_no_event(client, shop, pub):
    async with shop.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO shop.orders (item, qty) VALUES ('tea', 2)")
        await conn.execute("SAVEPOINT before_publish")
        assert await sql_publish(conn, "public:saved", "order.created", {"kept": False}) == 1
        await conn.execute("ROLLBACK TO SAVEPOINT before_publish")
        assert await sql_publish(conn, "public:saved", "order.created", {"kept": True}) == 1
    items = await history(client, "public:saved")
    assert [(e["offset"], e["data"]) for e in items] == [(1, {"kept": True})]
    assert (await publish(client, pub, "public:saved", "next"))["offset"] == 2


async def test_rest_and_sql_publishes_on_one_channel_stay_gapless_and_ordered(client, make_client, shop, pub):
    other = await make_client()
    other_pub = await token_for(other, "pub2", ("publisher",))
    channel = "public:mixed"
    ws = await WsClient.connect(other)
    await ws.subscribe(channel)
    per_source = 15

    async def rest(c, token, source):
        return [(await publish(c, token, channel, {"s": source, "n": n}))["offset"] for n in range(per_source)]

    async def sql(source):
        offsets = []
        async with shop.acquire() as conn:
            for n in range(per_source):
                async with conn.transaction():
                    await conn.execute("INSERT INTO shop.orders (item, qty) VALUES ($1, $2)", source, n)
                    offsets.append(await sql_publish(conn, channel, "order.created", {"s": source, "n": n}))
        return offsets

    results = await asyncio.gather(
        rest(client, pub, "rest-a"), rest(other, other_pub, "rest-b"), sql("sql-a"), sql("sql-b")
    )
    total = 4 * per_source
    for offsets in results:  # each source published one after another: its offsets increase
        assert offsets == sorted(offsets)
    assert sorted(o for offsets in results for o in offsets) == list(range(1, total + 1))
    items = await history(client, channel)
    assert [e["offset"] for e in items] == list(range(1, total + 1))
    for source in ("rest-a", "rest-b", "sql-a", "sql-b"):
        assert [e["data"]["n"] for e in items if e["data"]["s"] == source] == list(range(per_source))
    live = await ws.events(total)
    assert [e["offset"] for e in live] == list(range(1, total + 1))


# ------------------------------------------------------------ the row trigger


async def test_the_row_trigger_publishes_inserts_updates_and_deletes(client, shop):
    await shop.execute(
        """CREATE TRIGGER orders_to_herald AFTER INSERT OR UPDATE OR DELETE ON shop.orders
           FOR EACH ROW EXECUTE FUNCTION herald.publish_row_changes('public:orders.{id}')"""
    )
    ws = await WsClient.connect(client)
    await ws.subscribe("public:orders.1")
    async with shop.acquire() as conn:
        await conn.execute("INSERT INTO shop.orders (item, qty) VALUES ('tea', 2)")
        await conn.execute("UPDATE shop.orders SET qty = 3 WHERE id = 1")
        await conn.execute("DELETE FROM shop.orders WHERE id = 1")
    events = await ws.events(3)
    assert [(e["channel"], e["offset"], e["type"]) for e in events] == [
        ("public:orders.1", 1, "orders.insert"),
        ("public:orders.1", 2, "orders.update"),
        ("public:orders.1", 3, "orders.delete"),
    ]
    tea2, tea3 = {"id": 1, "item": "tea", "qty": 2}, {"id": 1, "item": "tea", "qty": 3}
    assert [e["data"] for e in events] == [
        {"new": tea2, "old": None},
        {"new": tea3, "old": tea2},
        {"new": None, "old": tea3},
    ]
    assert [e["offset"] for e in await history(client, "public:orders.1")] == [1, 2, 3]


async def test_a_trigger_whose_channel_is_invalid_fails_the_statement(client, shop):
    await shop.execute(
        """CREATE TRIGGER orders_to_herald AFTER INSERT ON shop.orders
           FOR EACH ROW EXECUTE FUNCTION herald.publish_row_changes('public:orders {item}')"""
    )
    with pytest.raises(asyncpg.PostgresError) as raised:
        await shop.execute("INSERT INTO shop.orders (item, qty) VALUES ('tea', 2)")
    assert raised.value.sqlstate == INVALID_PARAMETER_VALUE
    assert "channel" in raised.value.message
    assert await shop.fetchval("SELECT count(*) FROM shop.orders") == 0
    await shop.execute(  # a column the table does not have
        """CREATE OR REPLACE TRIGGER orders_to_herald AFTER INSERT ON shop.orders
           FOR EACH ROW EXECUTE FUNCTION herald.publish_row_changes('public:{nope}')"""
    )
    with pytest.raises(asyncpg.PostgresError) as raised:
        await shop.execute("INSERT INTO shop.orders (item, qty) VALUES ('tea', 2)")
    assert raised.value.sqlstate == INVALID_PARAMETER_VALUE
    assert "nope" in raised.value.message


# ------------------------------------------------------------ the role and validation


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM herald.events",
        "SELECT * FROM herald.users",
        "SELECT * FROM herald.idempotency_keys",
        """INSERT INTO herald.events (channel, "offset", type, data, time) VALUES ('x', 1, 't', '1', now())""",
        "UPDATE herald.channels SET last_offset = 0",
        "DELETE FROM herald.users",
        "SELECT herald.store_event('public:x', 't', '1')",
        "SELECT * FROM herald.publish_batch('{0}', '{public:x}', '{t}', '{1}', '{NULL}', '{NULL}', 1000, false)",
        "SELECT herald.check_event('public:x', 't')",
        "SELECT * FROM herald.store_events('{public:x}', '{t}', '{1}')",
        "SELECT * FROM herald.publish_request('s', 'k', '\\x00', '{public:x}', '{t}', '{1}', 1000)",
        "SELECT * FROM herald.request_keys",
    ],
)
async def test_the_publisher_role_cannot_touch_heralds_tables_or_other_functions(shop, sql):
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await shop.execute(sql)


async def test_without_the_grant_a_role_cannot_publish(database_url, settings):
    role = f"herald_test_nobody_{os.getpid()}"
    await admin_execute(database_url, f"CREATE ROLE {role} LOGIN PASSWORD 'x'")
    try:
        conn = await asyncpg.connect(database_url, user=role, password="x")
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval("SELECT herald.publish('public:x', 't', '1'::jsonb)")
        finally:
            await conn.close()
    finally:
        await admin_execute(database_url, f"DROP ROLE {role}")


async def test_a_callers_search_path_cannot_redirect_publish(client, shop):
    """SECURITY DEFINER with a pinned search_path: look-alike tables of the caller's are ignored."""
    async with shop.acquire() as conn:
        await conn.execute("CREATE TABLE shop.channels (name text PRIMARY KEY, last_offset bigint NOT NULL)")
        await conn.execute(
            'CREATE TABLE shop.events (channel text, "offset" bigint, type text, data text, time timestamptz)'
        )
        await conn.execute("SET search_path = shop, public")
        assert await sql_publish(conn, "public:path", None, None) == 1
        assert await conn.fetchval("SELECT count(*) FROM shop.events") == 0
        await conn.execute("DROP TABLE shop.channels, shop.events")
    (event,) = await history(client, "public:path")
    assert (event["type"], event["data"]) == ("message", None)  # SQL NULLs: "message" and JSON null


@pytest.mark.parametrize(
    ("channel", "type_", "argument"),
    [("bad channel!", "t", "channel"), (None, "t", "channel"), ("x" * 129, "t", "channel"), ("ok", "bad type", "type")],
)
async def test_a_bad_name_raises_22023_naming_it_and_aborts_only_that_transaction(
    client, shop, channel, type_, argument
):
    async with shop.acquire() as bad, shop.acquire() as good:
        bad_tx, good_tx = bad.transaction(), good.transaction()
        await bad_tx.start()
        await good_tx.start()
        await bad.execute("INSERT INTO shop.orders (item, qty) VALUES ('bad', 1)")
        with pytest.raises(asyncpg.PostgresError) as raised:
            await sql_publish(bad, channel, type_, {"x": 1})
        assert raised.value.sqlstate == INVALID_PARAMETER_VALUE
        assert raised.value.message.startswith(f"herald.publish: {argument} ")
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await bad.execute("SELECT 1")
        await bad_tx.rollback()
        assert await sql_publish(good, "public:fine", "t", {"x": 2}) == 1
        await good_tx.commit()
    assert [e["data"] for e in await history(client, "public:fine")] == [{"x": 2}]
    assert await shop.fetchval("SELECT count(*) FROM shop.orders") == 0


async def test_json_text_and_jsonb_overloads_store_the_value(client, shop):
    async with shop.acquire() as conn:
        # json keeps the text as given (\u0000 too); its newlines are only whitespace.
        await conn.execute("""SELECT herald.publish('public:kinds', 'j', '{"a": "\\u0000",\n "b": [1, 2]}'::json)""")
        await conn.execute("""SELECT herald.publish('public:kinds', 'b', '{"b": 1, "a": 2}'::jsonb)""")
        await conn.execute("""SELECT herald.publish('public:kinds', 't', '[1, "x"]')""")  # untyped: the text overload
        with pytest.raises(asyncpg.InvalidTextRepresentationError):
            await conn.execute("""SELECT herald.publish('public:kinds', 't', 'not json')""")
    items = await history(client, "public:kinds")
    assert [e["data"] for e in items] == [{"a": "\u0000", "b": [1, 2]}, {"a": 2, "b": 1}, [1, "x"]]


# ------------------------------------------------------------ publish_wait


async def test_a_rest_publish_behind_an_open_sql_transaction_gives_up_after_publish_wait(make_client, shop):
    client = await make_client({"database": {"publish_wait": 0.3}})
    token = await token_for(client, "pub", ("publisher",))
    async with shop.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        assert await sql_publish(conn, "public:held", "t", "sql") == 1
        resp = await client.post("/api/channels/public:held/events", json={"data": "rest"}, headers=bearer(token))
        assert resp.status == 503, await resp.text()
        problem = await resp.json()
        assert problem["code"] == "unavailable"
        assert "transaction" in problem["detail"]
        # Another channel does not wait.
        assert (await publish(client, token, "public:free", "ok"))["offset"] == 1
        await tx.commit()
    assert [e["data"] for e in await history(client, "public:held")] == ["sql"]
    assert (await publish(client, token, "public:held", "later"))["offset"] == 2


async def test_batch_publishes_behind_an_open_sql_transaction_give_up_and_store_nothing(make_client, shop):
    client = await make_client({"database": {"publish_wait": 0.3}})
    token = await token_for(client, "pub", ("publisher",))
    body = {"events": [{"channel": "public:other", "data": 1}, {"channel": "public:held", "data": 2}]}
    async with shop.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        assert await sql_publish(conn, "public:held", "t", "sql") == 1
        for headers in ({}, {"Idempotency-Key": "k"}):  # the group-committed and the keyed path
            resp = await client.post("/api/events", json=body, headers=bearer(token) | headers)
            assert resp.status == 503, await resp.text()
        resp = await client.post(
            "/api/broadcast", json={"channels": ["public:other", "public:held"]}, headers=bearer(token)
        )
        assert resp.status == 503
        await tx.commit()
    assert await history(client, "public:other") == []
    assert [e["data"] for e in await history(client, "public:held")] == ["sql"]
    resp = await client.post("/api/events", json=body, headers=bearer(token) | {"Idempotency-Key": "k"})
    assert resp.status == 201  # the refused attempt left no key behind


# ------------------------------------------------------------ the schema and its migration


@pytest.fixture
async def fresh_url(postgres) -> AsyncIterator[str]:
    name = f"herald_schema_{uuid.uuid4().hex[:12]}"
    await admin_execute(postgres.admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield postgres.url_for(name)
    finally:
        await admin_execute(postgres.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def old_runner(url: str) -> None:
    """What `run.py migrate` did before issue 13: 001-002 in public, recorded in public."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL)")
        for migration in db.load_migrations(LEGACY_MIGRATIONS):
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2)", migration.version, migration.name)
    finally:
        await conn.close()


async def test_the_migration_carries_a_database_of_the_old_layout_over_with_its_data(
    fresh_url, aiohttp_client, make_settings
):
    await old_runner(fresh_url)
    conn = await asyncpg.connect(fresh_url)
    try:
        await conn.execute(
            """INSERT INTO users (username, password_hash, roles)
                   VALUES ('old', 'x', '{publisher}'), ('gone', 'x', '{}');
               DELETE FROM users WHERE username = 'gone';
               INSERT INTO channels (name, last_offset) VALUES ('public:old', 2);
               INSERT INTO events (channel, "offset", type, data, time)
                   VALUES ('public:old', 1, 'a', '{"n":1}', now()), ('public:old', 2, 'b', '"\\u0000"', now());
               INSERT INTO idempotency_keys (channel, key, fingerprint, "offset")
                   VALUES ('public:old', 'k', '\\x00', 2)"""
        )
    finally:
        await conn.close()

    applied = await db.migrate(fresh_url)
    assert applied[0] == "003_schema"
    assert "130_publish_functions" in applied

    conn = await db.connect(fresh_url)
    try:
        public = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        assert public == []
        assert [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")][:3] == [
            1,
            2,
            3,
        ]
        assert await conn.fetchval("SELECT count(*) FROM herald.idempotency_keys") == 1
        # The users sequence went with its table: the next id follows the old ones.
        new_id = await conn.fetchval("INSERT INTO users (username, password_hash) VALUES ('new', 'x') RETURNING id")
        assert new_id == 3
    finally:
        await conn.close()

    client = await aiohttp_client(create_app(make_settings({"database": {"url": fresh_url}})))
    token = await token_for(client, "pub", ("publisher",))
    assert (await publish(client, token, "public:old", "new"))["offset"] == 3
    assert [(e["offset"], e["type"], e["data"]) for e in await history(client, "public:old")] == [
        (1, "a", {"n": 1}),
        (2, "b", "\u0000"),
        (3, "message", "new"),
    ]
    assert await db.migrate(fresh_url) == []


async def test_a_fresh_install_leaves_the_applications_tables_and_search_path_alone(
    fresh_url, aiohttp_client, make_settings
):
    """The application's public.users/events stay its own; Herald ignores the database's search_path."""
    await admin_execute(
        fresh_url,
        "CREATE TABLE public.users (email text PRIMARY KEY)",
        "CREATE TABLE public.events (what text)",
        "INSERT INTO public.users VALUES ('app@example.com')",
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET search_path = public', current_database()); END $$",
    )
    await db.migrate(fresh_url, schema="herald_alt")
    client = await aiohttp_client(create_app(make_settings({"database": {"url": fresh_url, "schema": "herald_alt"}})))
    token = await token_for(client, "pub", ("publisher",))
    ws = await WsClient.connect(client)
    await ws.subscribe("public:alt")
    assert (await publish(client, token, "public:alt", 1))["offset"] == 1
    (event,) = await ws.events(1)  # NOTIFY on herald_alt_events reached this app's broker
    assert event["offset"] == 1

    conn = await asyncpg.connect(fresh_url)
    try:
        assert await conn.fetch("SELECT email FROM public.users") == [("app@example.com",)]
        assert await conn.fetchval("SELECT count(*) FROM public.events") == 0
        assert await conn.fetchval("SELECT count(*) FROM herald_alt.events") == 1
        assert await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = 'herald_alt_publisher'") == 1
        assert await conn.fetchval("SELECT to_regclass('public.channels')") is None
    finally:
        await conn.close()


@pytest.mark.parametrize("schema", ["", "Herald", "1herald", "her-ald", "pg_herald", 'x"; DROP', "h" * 49])
def test_database_schema_must_be_a_plain_identifier(make_settings, schema):
    with pytest.raises(SettingsError, match=r"database\.schema"):
        make_settings({"database": {"schema": schema}})


async def test_every_herald_connection_sets_its_own_search_path(client, database_url):
    conn = await db.connect(database_url)
    try:
        assert await conn.fetchval("SHOW search_path") == '"herald", pg_temp'
    finally:
        await conn.close()
    assert await client.app[pool_key].fetchval("SELECT current_schema()") == "herald"
