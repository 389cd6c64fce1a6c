"""Presence (PROTOCOL §14): who is here, join and leave, across apps sharing the database.

Each test app is a process of its own as far as presence goes (its own name, beat and
rows), so two apps on the test database are two instances. Real process trees (SIGKILL
of a worker) are in test_processes.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from server.app import create_app
from server.identity.permissions import compile_rules, has_presence
from server.keys import hub_key, presence_key, roster_key
from server.realtime import presence as presence_module
from server.settings import SettingsError, build_settings
from server.storage import db
from tests.conftest import TEST_CHANNEL_RULES, wait_for
from tests.helpers import SseClient, WsClient, add_user, bearer, token_for

DEADLINE = 2.0  # PROTOCOL §14: changes are visible everywhere within 2 s
PRESENCE_RULES = [
    {"pattern": "room:*", "subscribe": ["authenticated"], "publish": ["publisher"], "presence": True},
    {"pattern": "lobby:*", "subscribe": ["anonymous"], "publish": ["publisher"], "presence": True},
    *TEST_CHANNEL_RULES,
]


def presence_settings(grace: float = 0.0, **realtime: Any) -> dict[str, Any]:
    return {"channels": PRESENCE_RULES, "realtime": {"presence_grace": grace, **realtime}}


async def presence_of(client, channel: str, token: str | None = None) -> dict[str, Any]:
    resp = await client.get(f"/api/channels/{channel}/presence", headers=bearer(token) if token else {})
    assert resp.status == 200, await resp.text()
    return await resp.json()


def summary(body: dict[str, Any]) -> tuple[int, list[tuple[str, int]]]:
    return body["clients"], [(u["username"], u["connections"]) for u in body["users"]]


async def until_presence(
    client, channel: str, expected, token: str | None = None, timeout: float = DEADLINE, unavailable_ok: bool = False
):
    """Wait (with a deadline) until the channel's presence summary is `expected`; with
    `unavailable_ok`, a 503 (the database coming back) counts as not yet."""
    seen: list[Any] = [None]

    async def matches() -> bool:
        if unavailable_ok:
            resp = await client.get(f"/api/channels/{channel}/presence", headers=bearer(token) if token else {})
            if resp.status == 503:
                return False
            assert resp.status == 200, await resp.text()
            seen.append(summary(await resp.json()))
        else:
            seen.append(summary(await presence_of(client, channel, token)))
        return seen[-1] == expected

    try:
        await wait_for(matches, timeout=timeout)
    except AssertionError:
        raise AssertionError(f"presence of {channel} is {seen[-1]}, not {expected}") from None


async def ws_as(client, token: str | None, channel: str) -> WsClient:
    ws = await WsClient.connect(client, f"/ws?access_token={token}" if token else "/ws")
    await ws.subscribe(channel)
    return ws


async def next_presence(ws: WsClient, timeout: float = 10.0) -> dict[str, Any]:
    """The next join or leave, skipping events and replies."""
    while True:
        message = await ws.receive(timeout)
        if message["op"] in ("join", "leave"):
            return message


def who(message: dict[str, Any]) -> tuple[str, str]:
    return message["op"], message["user"]["username"]


async def close(*clients) -> None:
    for c in clients:
        if isinstance(c, WsClient):
            await c.ws.close()
        else:
            c.close()


# the query


async def test_presence_counts_every_subscription_and_lists_identified_users_once_by_id(make_client):
    client = await make_client(presence_settings())
    bob = await token_for(client, "bob")
    alice = await token_for(client, "alice")  # id 2: listed after bob (id 1)
    tabs = [await ws_as(client, alice, "lobby:main") for _ in range(2)]
    stream = await SseClient.connect(client, f"channel=lobby:main&access_token={bob}")
    anonymous = await ws_as(client, None, "lobby:main")
    anonymous_sse = await SseClient.connect(client, "channel=lobby:main")
    try:
        await until_presence(client, "lobby:main", (5, [("bob", 1), ("alice", 2)]))
        body = await presence_of(client, "lobby:main")
        assert body["channel"] == "lobby:main"
        assert [u["id"] for u in body["users"]] == ["1", "2"]
        assert set(body["users"][0]) == {"id", "username", "connections"}
        # The WebSocket op answers the same.
        reply = await anonymous.request("presence", channel="lobby:main")
        assert reply["op"] == "ok"
        assert {k: reply[k] for k in ("channel", "clients", "users")} == body
        # The subscriber counts of GET /api/channels come from the same rows.
        token = await token_for(client, "pub", roles=("publisher",))
        await client.post("/api/channels/lobby:main/events", json={"data": 1}, headers=bearer(token))
        resp = await client.get("/api/channels", headers=bearer(token))
        assert {c["name"]: c["subscribers"] for c in (await resp.json())["items"]} == {"lobby:main": 5}

        await close(tabs[0], anonymous_sse)
        await until_presence(client, "lobby:main", (3, [("bob", 1), ("alice", 1)]))
        await close(stream)
        await until_presence(client, "lobby:main", (2, [("alice", 1)]))
    finally:
        await close(tabs[1], anonymous, stream, anonymous_sse)


async def test_users_are_ordered_by_id_as_strings(make_client):
    client = await make_client(presence_settings())
    tokens = {}
    for n in range(1, 11):  # ids 1..10: "10" sorts between "1" and "2"
        tokens[n] = await token_for(client, f"u{n}")
    clients = [await ws_as(client, tokens[n], "room:order") for n in (10, 2, 1)]
    try:
        await until_presence(client, "room:order", (3, [("u1", 1), ("u10", 1), ("u2", 1)]), tokens[1])
    finally:
        await close(*clients)


async def test_presence_off_is_403_for_everyone_admins_included(client):
    admin = await token_for(client, "root", roles=("admin",))
    for channel in ("public:news", "nothing-matches-this"):
        resp = await client.get(f"/api/channels/{channel}/presence", headers=bearer(admin))
        assert resp.status == 403, (channel, await resp.text())
        assert (await resp.json())["code"] == "forbidden"
    ws = await WsClient.connect(client, f"/ws?access_token={admin}")
    try:
        reply = await ws.request("presence", channel="public:news")
        assert (reply["op"], reply["code"]) == ("error", "forbidden")
    finally:
        await ws.ws.close()


async def test_callers_who_may_not_subscribe_learn_nothing(make_client):
    rules = [{"pattern": "staff:*", "subscribe": ["staff"], "publish": [], "presence": True}]
    client = await make_client({"channels": rules + PRESENCE_RULES})
    staff = await token_for(client, "carol", roles=("staff",))
    other = await token_for(client, "dave")
    ws_staff = await ws_as(client, staff, "staff:room")
    try:
        await until_presence(client, "staff:room", (1, [("carol", 1)]), staff)
        # The same answers whether or not anyone is here, whether or not presence is on.
        for channel in ("staff:room", "staff:empty"):
            resp = await client.get(f"/api/channels/{channel}/presence")
            assert resp.status == 401
            assert "carol" not in await resp.text()
            resp = await client.get(f"/api/channels/{channel}/presence", headers=bearer(other))
            assert resp.status == 403
            assert "carol" not in await resp.text()
        resp = await client.get("/api/channels/bad%20name/presence", headers=bearer(staff))
        assert resp.status == 422
        anonymous = await WsClient.connect(client)
        outsider = await WsClient.connect(client, f"/ws?access_token={other}")
        try:
            assert (await anonymous.request("presence", channel="staff:room"))["code"] == "unauthorized"
            assert (await outsider.request("presence", channel="staff:room"))["code"] == "forbidden"
            assert (await outsider.request("presence", channel="bad name"))["code"] == "validation_error"
            assert (await outsider.request("presence"))["code"] == "validation_error"
        finally:
            await close(anonymous, outsider)
    finally:
        await close(ws_staff)


# join and leave


async def test_join_once_for_three_tabs_and_leave_only_when_the_last_closes(make_client):
    client = await make_client(presence_settings(grace=0))
    watcher = await ws_as(client, await token_for(client, "watcher"), "room:a")
    alice = await token_for(client, "alice")
    marker = await token_for(client, "marker")
    sse_watcher = await SseClient.connect(client, f"channel=room:a&access_token={await token_for(client, 'w2')}")
    tabs = []
    try:
        assert who(await next_presence(watcher)) == ("join", "w2")
        tabs.append(await ws_as(client, alice, "room:a"))
        assert who(await next_presence(watcher)) == ("join", "alice")
        while True:  # the watcher's own join may reach this stream too: it opened just after
            join = await wait_for_data(sse_watcher)
            assert join.keys() == {"data"}  # not an event: no id, so it moves no cursor
            if orjson.loads(join["data"])["user"]["username"] == "alice":
                break
        tabs.append(await ws_as(client, alice, "room:a"))
        tabs.append(await ws_as(client, alice, "room:a"))
        await until_presence(client, "room:a", (5, [("watcher", 1), ("alice", 3), ("w2", 1)]), alice)
        await close(tabs[0], tabs[1])
        await until_presence(client, "room:a", (3, [("watcher", 1), ("alice", 1), ("w2", 1)]), alice)
        # Had the two closes sent a leave (or the tabs a second join), it would come before this.
        marker_ws = await ws_as(client, marker, "room:a")
        assert who(await next_presence(watcher)) == ("join", "marker")
        await close(tabs[2])
        assert who(await next_presence(watcher)) == ("leave", "alice")
        await close(marker_ws)
        assert who(await next_presence(watcher)) == ("leave", "marker")
    finally:
        await close(watcher, sse_watcher, *tabs)


async def test_join_and_leave_reach_sse_streams_without_an_id(make_client):
    client = await make_client(presence_settings(grace=0))
    stream = await SseClient.connect(client, "channel=lobby:sse")
    alice = await token_for(client, "alice")
    try:
        await until_presence(client, "lobby:sse", (1, []))
        ws = await ws_as(client, alice, "lobby:sse")
        fields = await wait_for_data(stream)
        assert "id" not in fields
        assert orjson.loads(fields["data"]) == {
            "op": "join",
            "channel": "lobby:sse",
            "user": {"id": "1", "username": "alice"},
        }
        await ws.ws.close()
        fields = await wait_for_data(stream)
        assert "id" not in fields
        assert orjson.loads(fields["data"])["op"] == "leave"
    finally:
        stream.close()


async def wait_for_data(stream: SseClient) -> dict[str, str]:
    while True:
        fields = await stream.message()
        if "data" in fields:
            return fields


async def test_the_joining_subscription_does_not_receive_its_own_join_and_anonymous_ones_cause_none(make_client):
    client = await make_client(presence_settings(grace=0))
    alice = await token_for(client, "alice")
    marker = await token_for(client, "marker")
    watcher = await ws_as(client, None, "lobby:b")
    first = await ws_as(client, alice, "lobby:b")
    try:
        assert who(await next_presence(watcher)) == ("join", "alice")
        anonymous = await ws_as(client, None, "lobby:b")
        await until_presence(client, "lobby:b", (3, [("alice", 1)]))
        await close(anonymous)
        await until_presence(client, "lobby:b", (2, [("alice", 1)]))
        await ws_as(client, marker, "lobby:b")
        # Neither the anonymous subscriber's coming and going nor alice's own join reached these.
        assert who(await next_presence(watcher)) == ("join", "marker")
        assert who(await next_presence(first)) == ("join", "marker")
    finally:
        await close(watcher, first)


async def test_a_burst_of_joins_written_together_arrives_whole_on_both_transports(make_client):
    """A tick's joins go to each subscriber in one write (frames, or SSE messages in one chunk)."""
    client = await make_client(presence_settings(grace=0))
    stream = await SseClient.connect(client, "channel=lobby:burst")
    watcher = await ws_as(client, None, "lobby:burst")
    tokens = [await token_for(client, f"u{n:02d}") for n in range(20)]
    roster = client.app[roster_key]
    try:
        await until_presence(client, "lobby:burst", (2, []))
        sent_before = roster.sent
        tabs = await asyncio.gather(*(ws_as(client, token, "lobby:burst") for token in tokens))
        joins = [who(await next_presence(watcher)) for _ in tokens]
        assert sorted(joins) == [("join", f"u{n:02d}") for n in range(20)]
        names = []
        while len(names) < 20:
            fields = await wait_for_data(stream)
            names.append(orjson.loads(fields["data"])["user"]["username"])
        assert sorted(names) == [f"u{n:02d}" for n in range(20)]
        assert roster.sent - sent_before >= 40  # messages, counted once per subscriber
        await close(*tabs)
    finally:
        await close(watcher, stream)


async def test_a_reconnect_within_the_grace_period_sends_neither_leave_nor_join(make_client):
    client = await make_client(presence_settings(grace=60))
    watcher = await ws_as(client, await token_for(client, "watcher"), "room:grace")
    users = {name: await token_for(client, name) for name in ("alice", "bob", "carol")}
    marker = await token_for(client, "marker")
    try:
        tabs = [await ws_as(client, token, "room:grace") for token in users.values()]
        assert sorted([who(await next_presence(watcher)) for _ in users]) == [
            ("join", "alice"),
            ("join", "bob"),
            ("join", "carol"),
        ]
        await close(*tabs)
        await until_presence(client, "room:grace", (1, [("watcher", 1)]), marker)
        tabs = [await ws_as(client, token, "room:grace") for token in users.values()]
        await until_presence(
            client, "room:grace", (4, [("watcher", 1), ("alice", 1), ("bob", 1), ("carol", 1)]), marker
        )
        tabs.append(await ws_as(client, marker, "room:grace"))
        assert who(await next_presence(watcher)) == ("join", "marker")
        await close(*tabs)
    finally:
        await close(watcher)


async def test_a_user_gone_longer_than_the_grace_gets_one_leave(make_client):
    client = await make_client(presence_settings(grace=0.5))
    watcher = await ws_as(client, await token_for(client, "watcher"), "room:late")
    alice = await token_for(client, "alice")
    try:
        tab = await ws_as(client, alice, "room:late")
        assert who(await next_presence(watcher)) == ("join", "alice")
        await close(tab)
        assert who(await next_presence(watcher)) == ("leave", "alice")
        tab = await ws_as(client, alice, "room:late")
        assert who(await next_presence(watcher)) == ("join", "alice")
        await close(tab)
    finally:
        await close(watcher)


# across instances


async def test_presence_and_join_leave_cross_instances(make_client, make_settings, aiohttp_client):
    client = await make_client(presence_settings(grace=0))
    other = await aiohttp_client(create_app(make_settings(presence_settings(grace=0))))
    alice = await token_for(client, "alice")
    bob = await token_for(client, "bob")
    here = await ws_as(client, alice, "room:x")
    there = None
    try:
        await until_presence(other, "room:x", (1, [("alice", 1)]), bob)
        there = await ws_as(other, bob, "room:x")
        assert who(await next_presence(here)) == ("join", "bob")
        await until_presence(client, "room:x", (2, [("alice", 1), ("bob", 1)]), alice)
        # alice opens a second tab on the other instance: no second join anywhere.
        second = await ws_as(other, alice, "room:x")
        await until_presence(other, "room:x", (3, [("alice", 2), ("bob", 1)]), bob)
        await close(here)
        await until_presence(other, "room:x", (2, [("alice", 1), ("bob", 1)]), bob)
        await close(second)
        assert who(await next_presence(there)) == ("leave", "alice")
        await until_presence(client, "room:x", (1, [("bob", 1)]), bob)
    finally:
        await close(here, *([there] if there else []))


async def test_a_silent_process_is_ignored_at_once_and_swept_with_a_leave(make_client, database_url):
    """A process that stopped beating (as a killed one does) is ignored after STALE_AFTER and
    swept by the live ones, which announce the leave. The real SIGKILL: test_processes.py."""
    client = await make_client(presence_settings(grace=0))
    watcher_token = await token_for(client, "watcher")
    watcher = await ws_as(client, watcher_token, "room:ghost")
    ghost = await add_user(client, "ghost")
    conn = await db.connect(database_url)
    try:
        await until_presence(client, "room:ghost", (1, [("watcher", 1)]), watcher_token)
        # A process that beat just in time, holding the ghost: the roster learns it from the table.
        await conn.execute("INSERT INTO presence_processes VALUES ('dead:1:x', now())")
        await conn.execute(
            "INSERT INTO presence_entries VALUES ('dead:1:x', 'room:ghost', $1, 'ghost', 2)", str(ghost.id)
        )
        client.app[roster_key].on_reconnect()  # as after a missed notification: read the table again
        assert who(await next_presence(watcher)) == ("join", "ghost")
        await until_presence(client, "room:ghost", (3, [("watcher", 1), ("ghost", 2)]), watcher_token)
        # It falls silent: ignored by the query, then swept, and the leave goes out.
        stale = presence_module.STALE_AFTER + 1
        await conn.execute(
            "UPDATE presence_processes SET beat_at = now() - make_interval(secs => $1) WHERE process = 'dead:1:x'",
            stale,
        )
        assert summary(await presence_of(client, "room:ghost", watcher_token)) == (1, [("watcher", 1)])
        assert who(await next_presence(watcher, timeout=presence_module.HEARTBEAT + 5)) == ("leave", "ghost")
        assert await conn.fetchval("SELECT count(*) FROM presence_processes WHERE process = 'dead:1:x'") == 0
    finally:
        await conn.close()
        await close(watcher)


# written only where changed; rebuilt after losing the rows


async def test_only_the_rows_that_changed_are_written(make_client, database_url):
    client = await make_client()
    ws = await WsClient.connect(client)
    conn = await db.connect(database_url)
    try:
        for n in range(50):
            await ws.subscribe(f"public:c{n}")

        async def rows():
            return {
                r["channel"]: r["xmin"] for r in await conn.fetch("SELECT channel, xmin::text FROM presence_entries")
            }

        await wait_for(lambda: rows_count(conn, 50), timeout=DEADLINE)
        before = await rows()
        await ws.subscribe("public:c50")
        await wait_for(lambda: rows_count(conn, 51), timeout=DEADLINE)
        after = await rows()
        assert {c: x for c, x in after.items() if c != "public:c50"} == before
        await ws.request("unsubscribe", channel="public:c7")
        await wait_for(lambda: rows_count(conn, 50), timeout=DEADLINE)
        assert {c: x for c, x in (await rows()).items() if c != "public:c50"} == {
            c: x for c, x in before.items() if c != "public:c7"
        }
    finally:
        await conn.close()
        await ws.ws.close()


async def rows_count(conn, n: int) -> bool:
    return await conn.fetchval("SELECT count(*) FROM presence_entries") == n


async def test_presence_lost_from_the_table_is_rebuilt_from_the_live_connections(make_client, database_url):
    client = await make_client(presence_settings(grace=60))
    alice = await token_for(client, "alice")
    tabs = [await ws_as(client, alice, "room:rebuild"), await ws_as(client, None, "lobby:rebuild")]
    conn = await db.connect(database_url)
    try:
        await until_presence(client, "room:rebuild", (1, [("alice", 1)]), alice)
        # What another process's sweep does to a process that could not beat (a long outage).
        # (Asserted on the DELETE itself: the process may beat, and rebuild, right after it.)
        assert await conn.execute("DELETE FROM presence_processes") == "DELETE 1"
        assert await conn.fetchval("SELECT count(*) FROM presence_entries") == 0
        await until_presence(client, "room:rebuild", (1, [("alice", 1)]), alice, timeout=presence_module.HEARTBEAT + 5)
        await until_presence(client, "lobby:rebuild", (1, []))
    finally:
        await conn.close()
        await close(*tabs)


async def test_a_database_outage_does_not_lose_presence(make_client, postgres):
    postgres.require_embedded()
    client = await make_client(presence_settings(grace=60))
    alice = await token_for(client, "alice")
    bob = await token_for(client, "bob")
    a = await ws_as(client, alice, "room:outage")
    b = await ws_as(client, bob, "room:outage")
    try:
        await until_presence(client, "room:outage", (2, [("alice", 1), ("bob", 1)]), alice)
        postgres.stop()
        try:
            await close(b)  # bob leaves while nothing can be written
            await wait_for(lambda: len(client.app[hub_key].channels["room:outage"]) == 1, timeout=5)
            resp = await client.get("/api/channels/room:outage/presence", headers=bearer(alice))
            assert resp.status == 503
        finally:
            postgres.start()
        await until_presence(client, "room:outage", (1, [("alice", 1)]), alice, timeout=30, unavailable_ok=True)
        assert client.app[presence_key].registered
    finally:
        await close(a, b)


# settings


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"channels": [{"pattern": "a:*", "presence": "yes"}]}, "channels[0].presence"),
        ({"channels": [{"pattern": "a:*", "presense": True}]}, "channels[0].presense"),
        ({"realtime": {"presence_grace": -1}}, "realtime.presence_grace"),
        ({"realtime": {"presence_grace": "soon"}}, "realtime.presence_grace"),
    ],
)
def test_bad_presence_settings_name_their_key(raw, key):
    with pytest.raises(SettingsError) as caught:
        build_settings(raw, {})
    assert caught.value.key == key


def test_presence_is_off_by_default_and_the_grace_may_be_zero():
    settings = build_settings(
        {"channels": [{"pattern": "a:*"}, {"pattern": "b:*", "presence": True}], "realtime": {"presence_grace": 0}},
        {"HERALD_REALTIME_PRESENCE_GRACE": "2.5"},
    )
    assert [rule.presence for rule in settings.channels] == [False, True]
    assert settings.realtime.presence_grace == 2.5
    rules = compile_rules(settings.channels)
    assert (has_presence("a:1", rules), has_presence("b:1", rules), has_presence("c:1", rules)) == (False, True, False)
    assert build_settings({}, {}).realtime.presence_grace == 5.0


async def test_names_from_any_issuer_are_escaped_in_the_answer(make_client, database_url):
    """Usernames of application tokens (PROTOCOL §13) are not restricted like Herald's own."""
    client = await make_client(presence_settings())
    token = await token_for(client, "alice")
    odd = 'quote " backslash \\ tab \t zoë </script>'
    conn = await db.connect(database_url)
    try:
        await conn.execute("INSERT INTO presence_processes VALUES ('other:1:x', now())")
        await conn.execute("INSERT INTO presence_entries VALUES ('other:1:x', 'room:odd', 'app:7', $1, 1)", odd)
        body = await presence_of(client, "room:odd", token)
        assert body == {
            "channel": "room:odd",
            "clients": 1,
            "users": [{"id": "app:7", "username": odd, "connections": 1}],
        }
    finally:
        await conn.close()


async def test_a_join_while_an_sse_stream_is_fixing_its_start_never_goes_out_before_its_headers(make_client):
    """handlers/sse.py subscribes before it sends the headers (§10a), so a join announced in
    that window must wait for nothing and write nothing: notices are never replayed."""
    client = await make_client(presence_settings())
    hub = client.app[hub_key]
    released = asyncio.Event()
    held = asyncio.Event()

    async def hold_sse(conn, channel: str) -> None:
        if conn.kind == "sse":
            held.set()
            await released.wait()

    hub.subscribe_hook = hold_sse
    try:
        ann = await ws_as(client, await token_for(client, "ann"), "lobby:start")
        opening = asyncio.create_task(SseClient.connect(client, "channel=lobby:start"))
        await asyncio.wait_for(held.wait(), 10)
        bob = await ws_as(client, await token_for(client, "bob"), "lobby:start")
        # Ann hears of Bob in the same announcement that reaches the held stream.
        assert who(await next_presence(ann)) == ("join", "bob")
        released.set()
        stream = await asyncio.wait_for(opening, 10)
        assert (await stream.message())["retry"] == "3000"
        await close(ann, bob, stream)
    finally:
        released.set()
        hub.subscribe_hook = None
