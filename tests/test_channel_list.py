"""GET /api/channels filters by permission in SQL over a bounded scan; empty channels are pruned
without their offsets ever restarting (issue 11)."""

from __future__ import annotations

import pytest

from server.identity.auth import Identity
from server.identity.permissions import compile_rules, may, subscribable_sql
from server.keys import pool_key, store_key
from server.settings import ChannelRule
from tests.helpers import bearer, token_for

RULES = compile_rules(
    ChannelRule(pattern, tuple(sub), ())
    for pattern, sub in [
        ("public:*", ["anonymous"]),
        ("user:{sub}", ["owner"]),
        ("user:{sub}:*", ["owner"]),
        ("team:[ab]?:*", ["staff"]),
        ("team:[!ab]*", ["authenticated"]),
        ("secret:*", ["admin"]),
        ("odd.name-x@y:*", ["authenticated"]),
        ("*", ["subscriber"]),
    ]
)
NAMES = [
    "public:a", "user:4", "user:5", "user:4:inbox", "user:5:inbox", "user:", "team:a1:x", "team:c1:x",
    "team:ab", "secret:x", "odd.name-x@y:z", "oddXname-x@y:z", "other", "user:4:inbox:deep",
]  # fmt: skip
IDENTITIES = [
    Identity("4", "four", frozenset()),
    Identity("5", "five", frozenset({"staff"})),
    Identity("6", "six", frozenset({"subscriber"})),
    Identity("7", "seven", frozenset({"admin"})),
]


@pytest.mark.parametrize("identity", IDENTITIES, ids=lambda i: i.username)
async def test_the_sql_filter_admits_exactly_what_may_allows(client, identity):
    pool = client.app[pool_key]
    await pool.execute("INSERT INTO channels (name, last_offset) SELECT n, 1 FROM unnest($1::text[]) AS n", NAMES)
    allowed_sql, params = subscribable_sql(identity, RULES, first_param=4)
    found, _ = await client.app[store_key].channels_page("", 1000, allowed_sql, params, 5000)
    assert [name for name, _ in found] == sorted(n for n in NAMES if may(identity, "subscribe", n, RULES))


async def test_a_page_looks_at_a_bounded_number_of_rows_and_says_where_to_go_on(client):
    pool = client.app[pool_key]
    hidden = [f"secret:{i:04}" for i in range(120)]
    await pool.execute(
        "INSERT INTO channels (name, last_offset) SELECT n, 1 FROM unnest($1::text[]) AS n", [*hidden, "zz:visible"]
    )
    identity = Identity("6", "six", frozenset({"subscriber"}))
    rules = compile_rules([ChannelRule("secret:*", ("admin",), ()), ChannelRule("*", ("subscriber",), ())])
    allowed_sql, params = subscribable_sql(identity, rules, first_param=4)
    store = client.app[store_key]
    found, cursor = await store.channels_page("", 10, allowed_sql, params, 50)
    assert (found, cursor) == ([], "secret:0049")  # nothing in the first 50 rows: go on from there
    seen = []
    while cursor is not None:
        found, cursor = await store.channels_page(cursor, 10, allowed_sql, params, 50)
        seen += found
    assert seen == [("zz:visible", 1)]


async def test_the_list_endpoint_pages_through_what_the_caller_may_follow(client):
    token = await token_for(client, "alice", ("subscriber",))
    pool = client.app[pool_key]
    await pool.execute(
        "INSERT INTO channels (name, last_offset) SELECT n, 2 FROM unnest($1::text[]) AS n",
        ["a:1", "a:2", "secret:1", "a:3", "user:99"],
    )
    resp = await client.get("/api/channels?limit=2", headers=bearer(token))
    page = await resp.json()
    assert ([i["name"] for i in page["items"]], page["next"]) == (["a:1", "a:2"], "a:2")
    page = await (await client.get("/api/channels?limit=2&after=a:2", headers=bearer(token))).json()
    assert ([i["name"] for i in page["items"]], page["next"]) == (["a:3"], None)  # secret:* and user:99 are not hers


async def age(pool, channel: str, column: str, table: str = "events") -> None:
    key = "channel" if table == "events" else "name"
    await pool.execute(f"UPDATE {table} SET {column} = {column} - interval '2 minutes' WHERE {key} = $1", channel)


async def test_an_emptied_channel_keeps_its_counter_for_a_history_ttl_and_is_pruned_after(make_client):
    client = await make_client({"events": {"history_ttl": 60, "prune_interval": 3600}})
    store, pool = client.app[store_key], client.app[pool_key]
    for _ in range(3):
        await store.publish("public:gone", "message", "1")
    await age(pool, "public:gone", "time")
    await store.prune()
    assert (await store.state("public:gone")).last_offset == 3  # empty, but the row keeps counting
    assert (await store.publish("public:gone", "message", "1"))[0].offset == 4
    await age(pool, "public:gone", "time")
    await store.prune()
    await age(pool, "public:gone", "emptied_at", "channels")  # empty for longer than the TTL
    await store.prune()
    assert await pool.fetchval("SELECT count(*) FROM channels WHERE name = 'public:gone'") == 0
    assert (await store.publish("public:gone", "message", "1"))[0].offset == 1  # long gone: a new channel


async def test_a_channel_with_events_again_or_with_subscribers_is_not_pruned(make_client):
    client = await make_client({"events": {"history_ttl": 60, "prune_interval": 3600}})
    store, pool = client.app[store_key], client.app[pool_key]
    for channel in ("public:back", "public:followed"):
        await store.publish(channel, "message", "1")
        await age(pool, channel, "time")
    await store.prune()
    await store.publish("public:back", "message", "2")  # it came back
    await pool.execute("INSERT INTO presence_processes (process) VALUES ('elsewhere')")
    await pool.execute(
        "INSERT INTO presence_entries (process, channel, member, connections)"
        " VALUES ('elsewhere', 'public:followed', '', 1)"
    )
    await store.prune()  # unmarks public:back
    for channel in ("public:back", "public:followed"):
        await age(pool, channel, "emptied_at", "channels")
    await store.prune()
    rows = await pool.fetch("SELECT name, last_offset FROM channels ORDER BY name")
    assert [(r["name"], r["last_offset"]) for r in rows] == [("public:back", 2), ("public:followed", 1)]


async def test_the_sql_filter_knows_issuer_id_prefixes_and_leaves_grants_to_may(client):
    from server.identity.permissions import compile_grants

    prefixed = compile_rules(
        [ChannelRule("user:{sub}", ("owner",), ()), ChannelRule("*", ("subscriber",), ())], id_prefixes=("app:",)
    )
    names = ["user:app:42", "user:app:43", "user:42", "news", "granted:1"]
    await client.app[pool_key].execute(
        "INSERT INTO channels (name, last_offset) SELECT n, 1 FROM unnest($1::text[]) AS n", names
    )
    store = client.app[store_key]
    app_user = Identity("app:42", "app user", frozenset())
    allowed_sql, params = subscribable_sql(app_user, prefixed, first_param=4, id_prefixes=("app:",))
    found, _ = await store.channels_page("", 100, allowed_sql, params, 5000)
    assert [name for name, _ in found] == ["user:app:42"]  # user:app:43 matched the owner rule: not hers
    granted = Identity("app:42", "app user", frozenset(), grants=compile_grants({"subscribe": ["granted:*"]}, "app:42"))
    assert subscribable_sql(granted, prefixed, first_param=4) == ("true", [])  # may() decides for grants
