"""PROTOCOL §5 (and §10 §2/§5): the WebSocket endpoint, through real connections, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
import time
import uuid
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from aiohttp import WSMsgType

from server.app import create_app
from server.keys import hub_key, store_key, tokens_key, users_key
from server.realtime.engine import close_connections
from tests.conftest import wait_for
from tests.helpers import WsClient, add_user, bearer, login, publish, token_for

DEADLINE = 10.0


# helpers


async def publisher_token(client) -> str:
    return await token_for(client, "pub", ("publisher",))


async def publish_many(client, token: str, channel: str, numbers, **kwargs) -> None:
    for n in numbers:
        await publish(client, token, channel, {"n": n}, **kwargs)


async def assert_nothing_pending(ws: WsClient) -> None:
    """The very next message is the pong to a fresh ping: nothing else was queued before it."""
    message_id = await ws.send("ping")
    assert await ws.receive() == {"op": "pong", "id": message_id}


def offsets(events: list[dict[str, Any]]) -> list[int]:
    return [e["offset"] for e in events]


def mint_token(client, user, seconds: int) -> str:
    """A token as a backend service would mint it (§10 §2), valid for `seconds`."""
    tokens = client.app[tokens_key]
    now = int(time.time())
    claims = {
        "sub": str(user.id),
        "name": user.username,
        "roles": list(user.roles),
        "iat": now,
        "exp": now + seconds,
        "iss": tokens.settings.jwt_issuer,
        "aud": tokens.settings.jwt_audience,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, tokens._signing_key, algorithm=tokens.algorithm)


def origin_of(client) -> str:
    return f"http://{client.host}:{client.port}"


async def stays_silent(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> None:
    """Read for `seconds`, expecting nothing at all (aiohttp answers pings inside receive())."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.receive(), seconds)


# welcome and authentication on the upgrade


async def test_welcome_comes_first_for_an_anonymous_connection(client):
    ws = await WsClient.connect(client)
    welcome = ws.welcome
    assert set(welcome) == {"op", "connection", "user", "heartbeat"}
    assert welcome["user"] is None
    assert welcome["heartbeat"] == 25
    assert isinstance(welcome["connection"], str)
    assert welcome["connection"]
    other = await WsClient.connect(client)
    assert other.welcome["connection"] != welcome["connection"]


async def test_welcome_carries_the_heartbeat_setting(aiohttp_client, make_settings, settings):
    client = await aiohttp_client(create_app(make_settings({"realtime": {"heartbeat": 7}})))
    ws = await WsClient.connect(client)
    assert ws.welcome["heartbeat"] == 7


@pytest.mark.parametrize("how", ["bearer", "query"])
async def test_welcome_names_the_user_of_a_token_on_the_upgrade(client, how):
    token = await token_for(client, "alice", ("subscriber", "publisher"))
    if how == "bearer":
        ws = await WsClient.connect(client, headers=bearer(token))
    else:
        ws = await WsClient.connect(client, f"/ws?access_token={token}")
    user = ws.welcome["user"]
    assert user == {"id": user["id"], "username": "alice", "roles": ["publisher", "subscriber"]}
    assert user["id"] == str((await client.app[users_key].page(None, 10))[0].id)


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/ws", {"Authorization": "Bearer not-a-jwt"}),
        ("/ws", {"Authorization": "Basic YWxpY2U6cHc="}),
        ("/ws?access_token=not-a-jwt", {}),
    ],
)
async def test_a_bad_credential_on_the_upgrade_is_401_before_the_upgrade(client, path, headers):
    with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
        await client.ws_connect(path, headers=headers)
    assert raised.value.status == 401


async def test_a_token_of_a_deleted_user_on_the_upgrade_is_401(client):
    token = await token_for(client, "alice")
    user = (await client.app[users_key].page(None, 10))[0]
    await client.app[users_key].delete(user.id)
    with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
        await client.ws_connect(f"/ws?access_token={token}")
    assert raised.value.status == 401


@pytest.mark.parametrize("origin", [None, "https://evil.example", "null"])
async def test_a_cookie_upgrade_without_a_trusted_origin_is_403(client, origin):
    await add_user(client)
    assert (await login(client)).status == 200
    with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
        await client.ws_connect("/ws", origin=origin)
    assert raised.value.status == 403


async def test_a_cookie_upgrade_from_the_servers_own_origin_is_welcomed_with_the_user(client):
    await add_user(client)
    assert (await login(client)).status == 200
    ws = await WsClient.connect(client, origin=origin_of(client))
    assert ws.welcome["user"]["username"] == "alice"
    assert ws.welcome["user"]["roles"] == ["subscriber"]
    reply = await ws.subscribe("private:stuff")  # needs an identity: the cookie's
    assert reply["recovered"] is True


# the auth op


async def test_auth_op_identifies_an_anonymous_connection(client):
    token = await token_for(client, "alice")
    ws = await WsClient.connect(client)
    reply = await ws.request("auth", token=token)
    assert reply["op"] == "ok"
    assert reply["user"]["username"] == "alice"
    assert reply["user"]["roles"] == ["subscriber"]
    assert set(reply["user"]) == {"id", "username", "roles"}
    assert (await ws.subscribe("private:stuff"))["channel"] == "private:stuff"


async def test_auth_op_with_a_bad_token_is_unauthorized_and_the_connection_stays_open(client):
    ws = await WsClient.connect(client)
    reply = await ws.request("auth", token="not-a-jwt")
    assert reply["op"] == "error"
    assert reply["code"] == "unauthorized"
    assert reply["message"]
    reply = await ws.request("subscribe", channel="private:stuff")
    assert reply["code"] == "unauthorized"  # still anonymous
    await assert_nothing_pending(ws)


async def test_auth_op_without_a_token_is_a_validation_error(client):
    ws = await WsClient.connect(client)
    reply = await ws.request("auth")
    assert (reply["op"], reply["code"]) == ("error", "validation_error")
    await assert_nothing_pending(ws)


# subscribe and live events


async def test_subscribe_replies_with_the_channels_last_offset_then_live_events_in_order(client):
    token = await publisher_token(client)
    await publish_many(client, token, "public:news", range(1, 4))
    ws = await WsClient.connect(client)
    message_id = await ws.send("subscribe", channel="public:news")
    reply = await ws.receive()
    assert reply == {"op": "ok", "id": message_id, "channel": "public:news", "offset": 3, "recovered": True}
    await assert_nothing_pending(ws)  # no offset: nothing replayed
    sent = [await publish(client, token, "public:news", {"n": n}, type_="news.item") for n in range(4, 9)]
    events = await ws.events(5)
    assert offsets(events) == [4, 5, 6, 7, 8]
    for event, stored in zip(events, sent, strict=True):
        assert set(event) == {"op", "channel", "offset", "type", "data", "time"}
        assert event == {"op": "event", **stored}
        assert event["type"] == "news.item"
    assert events[0]["data"] == {"n": 4}
    await assert_nothing_pending(ws)


async def test_subscribe_to_a_channel_without_events_starts_at_zero(client):
    ws = await WsClient.connect(client)
    reply = await ws.subscribe("public:empty", offset=0)
    assert (reply["offset"], reply["recovered"]) == (0, True)
    token = await publisher_token(client)
    await publish(client, token, "public:empty", "first")
    assert offsets(await ws.events(1)) == [1]


async def test_subscribe_without_permission_is_forbidden_with_an_identity(client):
    token = await token_for(client, "alice")
    ws = await WsClient.connect(client, headers=bearer(token))
    reply = await ws.request("subscribe", channel="secret:plans")
    assert (reply["op"], reply["code"]) == ("error", "forbidden")
    other_user = await ws.request("subscribe", channel="user:999")
    assert other_user["code"] == "forbidden"
    own_id = ws.welcome["user"]["id"]
    assert (await ws.subscribe(f"user:{own_id}"))["channel"] == f"user:{own_id}"


async def test_subscribe_without_credentials_is_unauthorized(client):
    ws = await WsClient.connect(client)
    for channel in ("private:stuff", "secret:plans", "user:1"):
        reply = await ws.request("subscribe", channel=channel)
        assert (reply["op"], reply["code"]) == ("error", "unauthorized"), channel
    await assert_nothing_pending(ws)


@pytest.mark.parametrize("channel", ["bad name", "", "x" * 129, "a/b", "ünï", None, 5, ["public:a"]])
async def test_subscribe_to_an_invalid_channel_name_is_a_validation_error(client, channel):
    ws = await WsClient.connect(client)
    reply = await ws.request("subscribe", channel=channel)
    assert (reply["op"], reply["code"]) == ("error", "validation_error")
    await assert_nothing_pending(ws)


@pytest.mark.parametrize("offset", [-1, "x", "3", 1.5, True, [1], {"o": 1}])
async def test_subscribe_with_a_bad_offset_is_a_validation_error(client, offset):
    ws = await WsClient.connect(client)
    reply = await ws.request("subscribe", channel="public:a", offset=offset)
    assert (reply["op"], reply["code"]) == ("error", "validation_error")
    assert (await ws.subscribe("public:a"))["recovered"] is True  # the failed attempt left nothing behind


async def test_subscribing_twice_is_a_conflict(client):
    ws = await WsClient.connect(client)
    await ws.subscribe("public:a")
    reply = await ws.request("subscribe", channel="public:a", offset=0)
    assert (reply["op"], reply["code"]) == ("error", "conflict")
    token = await publisher_token(client)
    await publish(client, token, "public:a", 1)
    assert offsets(await ws.events(1)) == [1]  # the first subscription still delivers, once
    await assert_nothing_pending(ws)


async def test_unsubscribe_stops_the_channels_events(client):
    token = await publisher_token(client)
    ws = await WsClient.connect(client)
    await ws.subscribe("public:a")
    await ws.subscribe("public:b")
    await publish(client, token, "public:a", "before")
    assert (await ws.events(1))[0]["data"] == "before"
    reply = await ws.request("unsubscribe", channel="public:a")
    assert (reply["op"], reply["channel"]) == ("ok", "public:a")
    await publish(client, token, "public:a", "after")
    await publish(client, token, "public:b", "marker")
    # Notifications arrive in commit order: had public:a's event been sent, it would come first.
    (event,) = await ws.events(1)
    assert (event["channel"], event["data"]) == ("public:b", "marker")
    await assert_nothing_pending(ws)
    assert (await ws.subscribe("public:a"))["offset"] == 2  # and it may subscribe again


async def test_unsubscribe_from_a_channel_not_followed_is_ok(client):
    ws = await WsClient.connect(client)
    reply = await ws.request("unsubscribe", channel="public:never")
    assert reply["op"] == "ok"


# resume


async def test_resume_replays_exactly_the_missed_events_then_goes_live(client):
    token = await publisher_token(client)
    await publish_many(client, token, "public:r", range(1, 6))
    ws = await WsClient.connect(client)
    message_id = await ws.send("subscribe", channel="public:r", offset=2)
    assert await ws.receive() == {"op": "ok", "id": message_id, "channel": "public:r", "offset": 5, "recovered": True}
    replayed = await ws.events(3)
    assert offsets(replayed) == [3, 4, 5]
    assert [e["data"] for e in replayed] == [{"n": 3}, {"n": 4}, {"n": 5}]
    await publish(client, token, "public:r", {"n": 6})
    assert offsets(await ws.events(1)) == [6]
    await assert_nothing_pending(ws)


async def test_resume_from_the_last_offset_replays_nothing(client):
    token = await publisher_token(client)
    await publish_many(client, token, "public:r", range(1, 4))
    ws = await WsClient.connect(client)
    reply = await ws.subscribe("public:r", offset=3)
    assert (reply["offset"], reply["recovered"]) == (3, True)
    await assert_nothing_pending(ws)
    await publish(client, token, "public:r", {"n": 4})
    assert offsets(await ws.events(1)) == [4]


async def test_resume_from_zero_replays_everything(client):
    token = await publisher_token(client)
    await publish_many(client, token, "public:r", range(1, 4))
    ws = await WsClient.connect(client)
    assert (await ws.subscribe("public:r", offset=0))["recovered"] is True
    assert [e["data"]["n"] for e in await ws.events(3)] == [1, 2, 3]
    await assert_nothing_pending(ws)


async def test_resume_while_events_are_being_published_has_no_gap_and_no_duplicate(client):
    token = await publisher_token(client)
    await publish_many(client, token, "public:busy", range(1, 21))
    ws = await WsClient.connect(client)
    publishing = asyncio.create_task(publish_many(client, token, "public:busy", range(21, 71)))
    try:
        reply = await ws.subscribe("public:busy", offset=0)
        assert reply["recovered"] is True
        assert 20 <= reply["offset"] <= 70
        events = await ws.events(70)
    finally:
        await publishing
    assert offsets(events) == list(range(1, 71))
    assert [e["data"]["n"] for e in events] == list(range(1, 71))
    await assert_nothing_pending(ws)


async def test_a_long_replay_racing_several_publishers_has_no_gap_and_no_duplicate(client):
    """History spans several replay pages and megabytes while three publishers keep going."""
    store = client.app[store_key]
    blob = orjson.dumps("h" * 8000).decode()
    for _ in range(600):
        await store.publish("public:busy", "message", blob)
    token = await publisher_token(client)
    ws = await WsClient.connect(client)
    publishers = [
        asyncio.create_task(publish_many(client, token, "public:busy", [f"{p}-{i}" for i in range(30)]))
        for p in range(3)
    ]
    try:
        reply = await ws.subscribe("public:busy", offset=0)
        assert reply["recovered"] is True
        events = await ws.events(690)
    finally:
        await asyncio.gather(*publishers)
    assert offsets(events) == list(range(1, 691))
    live = [e["data"]["n"] for e in events[600:]]
    for p in range(3):  # each publisher's events in its own order
        assert [n for n in live if n.startswith(f"{p}-")] == [f"{p}-{i}" for i in range(30)]
    await assert_nothing_pending(ws)


async def test_reconnect_and_resume_from_the_last_seen_offset_continues_exactly(client):
    token = await publisher_token(client)
    ws = await WsClient.connect(client)
    await ws.subscribe("public:r")
    await publish_many(client, token, "public:r", range(1, 5))
    seen = await ws.events(4)
    await ws.ws.close()
    await publish_many(client, token, "public:r", range(5, 9))
    again = await WsClient.connect(client)
    reply = await again.subscribe("public:r", offset=seen[-1]["offset"])
    assert (reply["offset"], reply["recovered"]) == (8, True)
    resumed = await again.events(4)
    await publish(client, token, "public:r", {"n": 9})
    resumed += await again.events(1)
    assert offsets(seen + resumed) == list(range(1, 10))
    assert [e["data"]["n"] for e in seen + resumed] == list(range(1, 10))
    await assert_nothing_pending(again)


async def test_resume_older_than_the_kept_history_is_not_recovered_and_replays_nothing(
    aiohttp_client, make_settings, settings
):
    client = await aiohttp_client(create_app(make_settings({"events": {"history_size": 3, "prune_interval": 0.2}})))
    token = await publisher_token(client)
    await publish_many(client, token, "public:short", range(1, 11))

    async def pruned() -> bool:
        resp = await client.get("/api/channels/public:short/events?after=0")
        items = (await resp.json())["items"]
        # Pruned down to the last 3: a pruning pass that ran while the ten were being
        # published kept more, and offset 1 could still be resumed from.
        return bool(items) and items[0]["offset"] == 8

    await wait_for(pruned)
    ws = await WsClient.connect(client)
    reply = await ws.subscribe("public:short", offset=1)
    assert (reply["offset"], reply["recovered"]) == (10, False)
    await assert_nothing_pending(ws)
    await publish(client, token, "public:short", {"n": 11})
    (event,) = await ws.events(1)
    assert (event["offset"], event["data"]) == (11, {"n": 11})
    await assert_nothing_pending(ws)


# publish op


async def test_publish_op_returns_the_stored_event_and_reaches_subscribers(client):
    token = await publisher_token(client)
    listener = await WsClient.connect(client)
    await listener.subscribe("public:chat")
    ws = await WsClient.connect(client, headers=bearer(token))
    message_id = await ws.send("publish", channel="public:chat", type="chat.msg", data={"text": "hi", "x": [1, None]})
    reply = await ws.receive()
    assert reply["op"] == "ok"
    assert reply["id"] == message_id
    stored = reply["event"]
    assert set(stored) == {"channel", "offset", "type", "data", "time"}
    assert (stored["channel"], stored["offset"], stored["type"]) == ("public:chat", 1, "chat.msg")
    assert stored["data"] == {"text": "hi", "x": [1, None]}
    (event,) = await listener.events(1)
    assert event == {"op": "event", **stored}
    history = await (await client.get("/api/channels/public:chat/events")).json()
    assert history["items"] == [stored]


async def test_publish_op_defaults_the_type_to_message(client):
    token = await publisher_token(client)
    ws = await WsClient.connect(client, f"/ws?access_token={token}")
    reply = await ws.request("publish", channel="public:chat", data="plain")
    assert (reply["op"], reply["event"]["type"], reply["event"]["data"]) == ("ok", "message", "plain")


async def test_publish_op_needs_permission(client):
    anonymous = await WsClient.connect(client)
    reply = await anonymous.request("publish", channel="public:chat", data=1)
    assert (reply["op"], reply["code"]) == ("error", "unauthorized")
    token = await token_for(client, "alice")  # a subscriber, not a publisher
    ws = await WsClient.connect(client, headers=bearer(token))
    reply = await ws.request("publish", channel="public:chat", data=1)
    assert (reply["op"], reply["code"]) == ("error", "forbidden")
    reply = await ws.request("publish", channel="bad name", data=1)
    assert (reply["op"], reply["code"]) == ("error", "validation_error")
    history = await (await client.get("/api/channels/public:chat/events")).json()
    assert history["items"] == []


async def test_publish_op_delivers_data_exactly_as_published(client):
    token = await publisher_token(client)
    listener = await WsClient.connect(client)
    await listener.subscribe("public:chat")
    ws = await WsClient.connect(client, headers=bearer(token))
    data = {"nul": "a\u0000b", "emoji": "\U0001f600", "quote": '"\\', "n": [0, -1.5, 1e300, True, None], "": {}}
    for value in (data, "text", 0, None, [], False):
        reply = await ws.request("publish", channel="public:chat", data=value)
        assert reply["event"]["data"] == value
        (event,) = await listener.events(1)
        assert event["data"] == value
        assert event["offset"] == reply["event"]["offset"]


@pytest.mark.parametrize("event_type", ["", "bad type", "x" * 65, 5, None, ["a"]])
async def test_publish_op_with_a_bad_type_is_a_validation_error(client, event_type):
    token = await publisher_token(client)
    ws = await WsClient.connect(client, headers=bearer(token))
    reply = await ws.request("publish", channel="public:chat", type=event_type, data=1)
    assert (reply["op"], reply["code"]) == ("error", "validation_error")
    await assert_nothing_pending(ws)


# ping, ids and malformed messages


@pytest.mark.parametrize("message_id", ["abc", 7, 2.5, None, True, -1, ""])
async def test_ping_answers_pong_echoing_any_scalar_id(client, message_id):
    ws = await WsClient.connect(client)
    await ws.ws.send_str(orjson.dumps({"op": "ping", "id": message_id}).decode())
    assert await ws.receive() == {"op": "pong", "id": message_id}


async def test_ping_without_an_id_answers_with_a_null_id(client):
    ws = await WsClient.connect(client)
    await ws.ws.send_str('{"op":"ping"}')
    assert await ws.receive() == {"op": "pong", "id": None}


async def test_ids_are_echoed_on_ok_and_error_replies(client):
    ws = await WsClient.connect(client)
    await ws.ws.send_str('{"op":"subscribe","id":"sub-1","channel":"public:a"}')
    assert (await ws.receive())["id"] == "sub-1"
    await ws.ws.send_str('{"op":"subscribe","id":"sub-2","channel":"secret:a"}')
    reply = await ws.receive()
    assert (reply["op"], reply["id"], reply["code"]) == ("error", "sub-2", "unauthorized")
    assert isinstance(reply["message"], str)
    assert reply["message"]


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "",
        "[1, 2]",
        '"ping"',
        "42",
        "null",
        '{"id": 1}',
        '{"op": "dance", "id": 1}',
        '{"op": 5, "id": 1}',
        '{"op": "ping", "id": {"a": 1}}',
        '{"op": "ping", "id": [1]}',
    ],
)
async def test_malformed_messages_are_bad_request_and_the_connection_stays_open(client, text):
    ws = await WsClient.connect(client)
    await ws.ws.send_str(text)
    reply = await ws.receive()
    assert (reply["op"], reply["code"]) == ("error", "bad_request")
    assert reply["id"] in (None, 1)
    assert isinstance(reply["message"], str)
    assert reply["message"]
    await assert_nothing_pending(ws)


async def test_an_unknown_op_echoes_the_id(client):
    ws = await WsClient.connect(client)
    await ws.ws.send_str('{"op": "dance", "id": "d1"}')
    reply = await ws.receive()
    assert set(reply) == {"op", "id", "code", "message"}
    assert (reply["op"], reply["id"], reply["code"]) == ("error", "d1", "bad_request")


# frames the protocol refuses


async def test_a_binary_frame_closes_with_1003(client):
    ws = await WsClient.connect(client)
    await ws.ws.send_bytes(b'{"op":"ping"}')
    assert await ws.closed_with() == 1003


async def test_a_frame_over_max_frame_bytes_closes_with_1009(aiohttp_client, make_settings, settings):
    client = await aiohttp_client(create_app(make_settings({"realtime": {"max_frame_bytes": 1024}})))
    ws = await WsClient.connect(client)
    fits = orjson.dumps({"op": "ping", "id": "x" * 900}).decode()
    assert len(fits) <= 1024
    await ws.ws.send_str(fits)
    assert (await ws.receive())["op"] == "pong"
    await ws.ws.send_str(orjson.dumps({"op": "ping", "id": "x" * 1100}).decode())
    assert await ws.closed_with() == 1009


# heartbeat


async def test_a_client_that_never_answers_pings_is_closed(aiohttp_client, make_settings, settings):
    client = await aiohttp_client(create_app(make_settings({"realtime": {"heartbeat": 1}})))
    ws = await client.ws_connect("/ws", autoping=False)
    welcome = orjson.loads((await ws.receive(timeout=DEADLINE)).data)
    assert (welcome["op"], welcome["heartbeat"]) == ("welcome", 1)
    started = time.monotonic()
    pings = 0
    async with asyncio.timeout(6):
        while True:
            message = await ws.receive()
            if message.type == WSMsgType.PING:
                pings += 1
                continue
            assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR), message
            break
    assert pings >= 1
    assert time.monotonic() - started >= 1  # not before the first ping was due
    await wait_for(lambda: not client.app[hub_key].connections)


async def test_a_client_that_answers_pings_stays_open_while_idle(aiohttp_client, make_settings, settings):
    client = await aiohttp_client(create_app(make_settings({"realtime": {"heartbeat": 1}})))
    ws = await WsClient.connect(client)
    started = time.monotonic()
    await stays_silent(ws.ws, 3.5)  # aiohttp answers the server's pings inside receive()
    assert time.monotonic() - started > 3
    await assert_nothing_pending(ws)
    assert not ws.ws.closed


async def test_a_pong_later_than_half_the_heartbeat_but_within_it_is_in_time(aiohttp_client, make_settings, settings):
    """§10 §5: a whole heartbeat for the pong, not aiohttp's default of half of it."""
    client = await aiohttp_client(create_app(make_settings({"realtime": {"heartbeat": 1}})))
    ws = await client.ws_connect("/ws", autoping=False)
    assert orjson.loads((await ws.receive(timeout=DEADLINE)).data)["op"] == "welcome"
    ping = await ws.receive(timeout=DEADLINE)
    assert ping.type == WSMsgType.PING
    await stays_silent(ws, 0.7)  # answer late: after 0.7 of the heartbeat
    await ws.pong(ping.data)
    ping = await ws.receive(timeout=DEADLINE)  # still open: the next ping comes
    assert ping.type == WSMsgType.PING
    await ws.pong(ping.data)
    await ws.send_str('{"op": "ping", "id": 1}')
    reply = await ws.receive(timeout=DEADLINE)
    assert reply.type == WSMsgType.TEXT, reply
    assert orjson.loads(reply.data) == {"op": "pong", "id": 1}
    await ws.close()


# token expiry and user removal


async def test_a_token_that_expires_closes_the_connection_with_4401(client):
    user = await add_user(client)
    token = mint_token(client, user, 2)
    ws = await WsClient.connect(client, headers=bearer(token))
    assert ws.welcome["user"]["username"] == "alice"
    started = time.monotonic()
    assert await ws.closed_with(timeout=6) == 4401
    assert time.monotonic() - started < 6
    assert time.time() >= jwt.decode(token, options={"verify_signature": False})["exp"] - 0.05


async def test_a_token_given_by_the_auth_op_that_expires_closes_with_4401(client):
    user = await add_user(client)
    ws = await WsClient.connect(client)
    reply = await ws.request("auth", token=mint_token(client, user, 2))
    assert reply["op"] == "ok"
    assert await ws.closed_with(timeout=6) == 4401


async def test_a_fresh_token_by_the_auth_op_keeps_the_connection_open_past_the_old_expiry(client):
    user = await add_user(client)
    old = mint_token(client, user, 2)
    ws = await WsClient.connect(client, f"/ws?access_token={old}")
    fresh = client.app[tokens_key].issue(str(user.id), user.username, user.roles)
    reply = await ws.request("auth", token=fresh)
    assert (reply["op"], reply["user"]["username"]) == ("ok", "alice")
    old_exp = jwt.decode(old, options={"verify_signature": False})["exp"]
    await stays_silent(ws.ws, max(0.0, old_exp - time.time()) + 1.0)
    assert time.time() > old_exp
    await assert_nothing_pending(ws)


async def test_the_auth_op_cannot_switch_to_another_user(client):
    token = await token_for(client, "alice")
    other = await token_for(client, "bob")
    ws = await WsClient.connect(client, headers=bearer(token))
    reply = await ws.request("auth", token=other)
    assert (reply["op"], reply["code"]) == ("error", "forbidden")
    assert (await ws.request("auth", token=token))["user"]["username"] == "alice"


@pytest.mark.parametrize("action", ["delete", "disable"])
async def test_a_user_removed_while_connected_is_closed_with_4403(client, action):
    admin = await token_for(client, "root", ("admin",))
    token = await token_for(client, "alice")
    ws = await WsClient.connect(client, headers=bearer(token))
    bystander = await WsClient.connect(client, headers=bearer(admin))
    user_id = ws.welcome["user"]["id"]
    if action == "delete":
        resp = await client.delete(f"/api/users/{user_id}", headers=bearer(admin))
        assert resp.status == 204
    else:
        resp = await client.patch(f"/api/users/{user_id}", json={"disabled": True}, headers=bearer(admin))
        assert resp.status == 200, await resp.text()
    assert await ws.closed_with(timeout=DEADLINE) == 4403
    await assert_nothing_pending(bystander)


async def test_a_user_removed_through_the_store_closes_a_cookie_connection_with_4403(client):
    user = await add_user(client)
    assert (await login(client)).status == 200
    ws = await WsClient.connect(client, origin=origin_of(client))
    await client.app[users_key].delete(user.id)
    assert await ws.closed_with(timeout=DEADLINE) == 4403


# slow consumers


class RawWebSocket:
    """A hand-made WebSocket client on a socket with a tiny receive buffer, read only on demand."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    @classmethod
    async def connect(cls, client, path: str = "/ws") -> RawWebSocket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (client.host, client.port))
        self = cls(sock)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {client.host}:{client.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        head = await self.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return self

    async def _fill(self) -> None:
        chunk = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 65536), DEADLINE)
        if not chunk:
            raise EOFError
        self.buffer += chunk

    async def read_until(self, separator: bytes) -> bytes:
        while separator not in self.buffer:
            await self._fill()
        head, _, self.buffer = self.buffer.partition(separator)
        return head

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            await self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    async def frame(self) -> tuple[int, bytes]:
        first, second = await self.read_exactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.read_exactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.read_exactly(8))
        return first & 0x0F, await self.read_exactly(length)

    async def message(self) -> dict[str, Any]:
        opcode, payload = await self.frame()
        assert opcode == 0x1, (opcode, payload)
        return orjson.loads(payload)

    async def send(self, message: dict[str, Any]) -> None:
        payload = orjson.dumps(message)
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await asyncio.get_running_loop().sock_sendall(self.sock, bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    async def close_code_or_eof(self) -> int | None:
        """Read everything until the server closes: its close code, or None if it just dropped us."""
        try:
            while True:
                opcode, payload = await self.frame()
                if opcode == 0x8:
                    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        except (EOFError, ConnectionError):
            return None

    def close(self) -> None:
        self.sock.close()


async def flood(client, hub, token: str, channel: str, cap: int = 1000) -> int:
    """Publish 32 KB events until the hub closes a slow consumer (plus a few more); returns the count.

    The server's kernel send buffer on loopback grows to several MB, so the limit is only
    passed once that much is stuck; the cap keeps a broken hub from looping forever.
    """
    blob = "x" * 32768
    published = 0
    extra = 5
    while published < cap and extra:
        published += 1
        await publish(client, token, channel, {"n": published, "blob": blob})
        if hub.slow_closes:
            extra -= 1
    return published


async def slow_consumer(client) -> RawWebSocket:
    slow = await RawWebSocket.connect(client)
    assert (await slow.message())["op"] == "welcome"
    await slow.send({"op": "subscribe", "id": 1, "channel": "public:firehose"})
    assert (await slow.message())["op"] == "ok"
    return slow


async def test_a_slow_consumer_is_closed_and_never_delays_the_others(aiohttp_client, make_settings, settings):
    client = await aiohttp_client(create_app(make_settings({"realtime": {"outbound_buffer": 65536}})))
    hub = client.app[hub_key]
    token = await publisher_token(client)
    slow = await slow_consumer(client)
    try:
        fast = await WsClient.connect(client)
        await fast.subscribe("public:firehose")
        received: list[dict[str, Any]] = []

        async def receive_all() -> None:
            while True:
                received.extend(await fast.events(1))

        receiving = asyncio.create_task(receive_all())
        try:
            count = await flood(client, hub, token, "public:firehose")
            await wait_for(lambda: len(received) >= count)
        finally:
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiving
        assert hub.slow_closes == 1
        assert offsets(received) == list(range(1, count + 1))
        assert all(e["data"]["n"] == e["offset"] for e in received)
        await assert_nothing_pending(fast)
        await wait_for(lambda: len(hub.connections) == 1)
        assert hub.counts() == {"public:firehose": 1}
        # The slow client finds its connection closed: a 4008 after the backlog, or dropped outright.
        assert await slow.close_code_or_eof() in (4008, None)
    finally:
        slow.close()
    assert hub.slow_closes == 1


async def test_a_slow_consumer_that_reads_at_last_finds_4008_after_gapless_events(
    aiohttp_client, make_settings, settings
):
    client = await aiohttp_client(create_app(make_settings({"realtime": {"outbound_buffer": 65536}})))
    hub = client.app[hub_key]
    token = await publisher_token(client)
    slow = await slow_consumer(client)
    try:
        count = await flood(client, hub, token, "public:firehose")
        assert hub.slow_closes == 1
        seen = []
        async with asyncio.timeout(DEADLINE):
            while True:
                opcode, payload = await slow.frame()
                if opcode != 0x1:
                    break
                seen.append(orjson.loads(payload)["offset"])
        assert opcode == 0x8
        assert struct.unpack("!H", payload[:2])[0] == 4008
        assert payload[2:] == b"slow consumer"
        assert seen == list(range(1, len(seen) + 1))  # what arrived has no gap
        assert len(seen) < count
    finally:
        slow.close()


# graceful shutdown


async def test_shutdown_closes_connections_with_1001(aiohttp_client, settings):
    client = await aiohttp_client(create_app(settings))
    ws = await WsClient.connect(client)
    await ws.subscribe("public:a")
    closing = asyncio.create_task(ws.closed_with(timeout=DEADLINE))
    await asyncio.wait_for(client.server.close(), DEADLINE)
    assert await closing == 1001


async def test_close_connections_sends_1001_to_every_connection(client):
    first = await WsClient.connect(client)
    second = await WsClient.connect(client)
    closing = [asyncio.create_task(ws.closed_with(timeout=DEADLINE)) for ws in (first, second)]
    await close_connections(client.app)
    assert await asyncio.gather(*closing) == [1001, 1001]
    await wait_for(lambda: not client.app[hub_key].connections)


# rate limits (PROTOCOL §8, §10 §5)


async def test_websocket_publishes_share_the_rest_bucket_and_a_flood_is_closed_4429(
    aiohttp_client, make_settings, settings
):
    client = await aiohttp_client(create_app(make_settings({"limits": {"rate": 0.001, "burst": 4}})))
    token = await token_for(client, "flooder", roles=("publisher",))
    ws = await WsClient.connect(client, f"/ws?access_token={token}")  # the connection attempt: 1 token
    resp = await client.post(
        "/api/channels/public:flood/events", json={"data": 1}, headers=bearer(token)
    )  # REST publish: 1 token
    assert resp.status == 201
    assert (await ws.request("publish", channel="public:flood", data=2))["op"] == "ok"  # 1 token
    assert (await ws.request("publish", channel="public:flood", data=3))["op"] == "ok"  # the last one
    for _ in range(10):
        reply = await ws.request("publish", channel="public:flood", data="refused")
        assert (reply["op"], reply["code"]) == ("error", "rate_limited")
    # The REST bucket is the same one: it is empty too.
    resp = await client.post("/api/channels/public:flood/events", json={"data": 4}, headers=bearer(token))
    assert resp.status == 429
    # The eleventh refusal in a row closes the connection.
    await ws.send("publish", channel="public:flood", data="refused")
    assert await ws.closed_with() == 4429
    history = await (await client.get("/api/channels/public:flood/events")).json()
    assert [e["data"] for e in history["items"]] == [1, 2, 3]


async def test_a_slow_consumer_gets_4008_right_behind_what_the_transport_holds(aiohttp_client, make_settings, settings):
    """Issue 10: once judged slow, nothing more is queued for it and what Herald still held is
    dropped, so the close frame is not stuck behind a megabyte of stale events."""
    client = await aiohttp_client(create_app(make_settings({"realtime": {"outbound_buffer": 1048576}})))
    hub = client.app[hub_key]
    token = await publisher_token(client)
    slow = await slow_consumer(client)
    [conn] = list(hub.connections)
    try:
        await flood(client, hub, token, "public:firehose")
        assert hub.slow_closes == 1
        # In Herald's hands: at most the soft limit, one event frame and the close frame.
        assert conn.transport.get_write_buffer_size() <= hub.soft_limit + 33000 + 64
        seen = []
        async with asyncio.timeout(DEADLINE * 3):
            while True:
                opcode, payload = await slow.frame()
                if opcode != 0x1:
                    break
                seen.append(orjson.loads(payload)["offset"])
        assert opcode == 0x8
        assert struct.unpack("!H", payload[:2])[0] == 4008
        assert seen == list(range(1, len(seen) + 1))
    finally:
        slow.close()
