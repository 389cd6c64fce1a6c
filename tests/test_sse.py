"""Server-Sent Events (PROTOCOL §6 and §10's §6), through real HTTP against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from server.app import create_app
from server.keys import hub_key
from server.realtime.engine import close_connections
from server.realtime.wire import decode_cursor
from tests.conftest import wait_for
from tests.helpers import SseClient, bearer, publish, token_for

RETRY = b"retry: 3000\n\n"
DEADLINE = 10.0


class ProductionLikeServer(TestServer):
    """aiohttp's TestServer cancels a handler when its client leaves; server/process/worker.py's runner
    does not (aiohttp's default), so a stream must notice a departed client by itself."""

    async def _make_runner(self, **kwargs):
        kwargs["handler_cancellation"] = False
        return web.AppRunner(self.app, **kwargs)


@pytest.fixture
async def make_production_client(aiohttp_client, make_settings, settings):
    async def make(raw=None):
        return await aiohttp_client(ProductionLikeServer(create_app(make_settings(raw))))

    return make


@pytest.fixture
async def publisher(client) -> str:
    return await token_for(client, "pub", roles=("publisher",))


async def publish_many(client, token: str, channel: str, values) -> list[dict]:
    return [await publish(client, token, channel, {"n": value}) for value in values]


async def opening(stream: SseClient) -> str:
    """Read the opening (retry, then the id-only cursor message); return the cursor."""
    assert await stream.message() == {"retry": "3000"}
    fields = await stream.message()
    assert set(fields) == {"id"}, fields
    return fields["id"]


async def data_messages(stream: SseClient, count: int) -> list[tuple[dict, dict]]:
    """The next `count` messages that carry data, as (raw fields, decoded data); others skipped."""
    found = []
    while len(found) < count:
        fields = await stream.message()
        if "data" in fields:
            found.append((fields, orjson.loads(fields["data"])))
        else:
            assert set(fields) in ({""}, {"id"}, {"retry"}), fields  # a ping, the cursor or the retry line
    return found


def offsets(events: list[dict]) -> list[int]:
    return [e["offset"] for e in events]


async def assert_problem(resp, status: int, code: str) -> dict:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["code"] == code
    return body


# the stream's shape


async def test_headers_retry_first_then_an_id_only_cursor(client, publisher):
    await publish_many(client, publisher, "public:h", [1, 2])
    resp = await client.get("/sse?channel=public:h")
    try:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert resp.headers["X-Request-Id"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert "aiohttp" not in resp.headers.get("Server", "").lower()
        assert await asyncio.wait_for(resp.content.readexactly(len(RETRY)), DEADLINE) == RETRY
        stream = SseClient(resp)
        fields = await stream.message()
        assert set(fields) == {"id"}, fields  # no data: sets lastEventId, fires no message
        # A fresh stream starts at the channel's end: nothing old is replayed.
        assert decode_cursor(fields["id"], ("public:h",)) == {"public:h": 2}
        event, _ = await asyncio.gather(stream.data(), publish(client, publisher, "public:h", "live"))
        assert event["offset"] == 3
        assert event["data"] == "live"
    finally:
        resp.close()


async def test_each_event_is_one_message_with_data_and_an_id(client, publisher):
    stream = await SseClient.connect(client, "channel=public:e")
    try:
        first = await opening(stream)
        published = await publish_many(client, publisher, "public:e", [1, 2, 3])
        published.append(await publish(client, publisher, "public:e", {"nul": "a\u0000b", "list": [1, None]}, "x.y"))
        received = await data_messages(stream, 4)
        ids = [first]
        for (fields, data), event in zip(received, published, strict=True):
            assert set(fields) == {"id", "data"}, fields  # no `event:` field, so onmessage fires
            assert data == {"op": "event", **event}
            assert set(data) == {"op", "channel", "offset", "type", "data", "time"}
            ids.append(fields["id"])
        assert len(set(ids)) == len(ids)
        assert [decode_cursor(i, ("public:e",)) for i in ids] == [{"public:e": n} for n in range(5)]
        assert received[3][1]["type"] == "x.y"
        assert received[3][1]["data"] == {"nul": "a\u0000b", "list": [1, None]}
    finally:
        stream.close()

    # Each id resumes right after its own event.
    for position, event_id in enumerate(ids[:4]):
        resumed = await SseClient.connect(client, "channel=public:e", headers={"Last-Event-ID": event_id})
        try:
            await opening(resumed)
            assert offsets(await resumed.events(4 - position)) == list(range(position + 1, 5))
        finally:
            resumed.close()


# resuming


@pytest.mark.parametrize("via", ["header", "query"])
async def test_resume_sends_exactly_the_missed_events_then_live_ones(client, publisher, via):
    stream = await SseClient.connect(client, "channel=public:r")
    try:
        await opening(stream)
        await publish_many(client, publisher, "public:r", [1, 2, 3])
        assert offsets(await stream.events(3)) == [1, 2, 3]
        last_id = stream.last_id
    finally:
        stream.close()
    await publish_many(client, publisher, "public:r", [4, 5, 6])

    if via == "header":
        resumed = await SseClient.connect(client, "channel=public:r", headers={"Last-Event-ID": last_id})
    else:
        resumed = await SseClient.connect(client, f"channel=public:r&last_event_id={last_id}")
    try:
        cursor = await opening(resumed)
        assert decode_cursor(cursor, ("public:r",)) == {"public:r": 3}
        missed = [data for _, data in await data_messages(resumed, 3)]
        assert [(e["op"], e["offset"], e["data"]) for e in missed] == [("event", n, {"n": n}) for n in (4, 5, 6)]
        await publish_many(client, publisher, "public:r", [7, 8])
        live = [data for _, data in await data_messages(resumed, 2)]
        assert [(e["op"], e["offset"]) for e in live] == [("event", 7), ("event", 8)]
        assert decode_cursor(resumed.last_id, ("public:r",)) == {"public:r": 8}
    finally:
        resumed.close()


async def test_a_multi_channel_stream_resumes_every_channel_from_one_cursor(client, publisher):
    stream = await SseClient.connect(client, "channel=public:a&channel=public:b")
    try:
        await opening(stream)
        await publish(client, publisher, "public:a", "a1")
        await publish(client, publisher, "public:b", "b1")
        await publish(client, publisher, "public:a", "a2")
        assert [(e["channel"], e["offset"]) for e in await stream.events(3)] == [
            ("public:a", 1),
            ("public:b", 1),
            ("public:a", 2),
        ]
        last_id = stream.last_id
    finally:
        stream.close()
    assert decode_cursor(last_id, ("public:a", "public:b")) == {"public:a": 2, "public:b": 1}
    for n in range(3, 6):
        await publish(client, publisher, "public:a", f"a{n}")
    for n in range(2, 5):
        await publish(client, publisher, "public:b", f"b{n}")

    # The same channels in another order are the same stream.
    resumed = await SseClient.connect(client, "channel=public:b&channel=public:a", headers={"Last-Event-ID": last_id})
    try:
        await opening(resumed)
        missed = [data for _, data in await data_messages(resumed, 6)]
        assert all(e["op"] == "event" for e in missed)
        by_channel = {c: [e["data"] for e in missed if e["channel"] == c] for c in ("public:a", "public:b")}
        assert by_channel == {"public:a": ["a3", "a4", "a5"], "public:b": ["b2", "b3", "b4"]}
        await publish(client, publisher, "public:b", "b5")
        await publish(client, publisher, "public:a", "a6")
        live = [data for _, data in await data_messages(resumed, 2)]
        assert [(e["channel"], e["data"]) for e in live] == [("public:b", "b5"), ("public:a", "a6")]
        positions = decode_cursor(resumed.last_id, ("public:a", "public:b"))
        assert positions == {"public:a": 6, "public:b": 5}
    finally:
        resumed.close()


# resets


@pytest.mark.parametrize("cursor", ["garbage", "0-1.2", "zz-1.x", "-", "\u00e9t\u00e9"])
async def test_an_unparseable_last_event_id_resets_every_channel(client, publisher, cursor):
    await publish(client, publisher, "public:x", "old")
    headers = {"Last-Event-ID": cursor} if cursor.isascii() else {}
    query = "channel=public:x&channel=public:y" + ("" if cursor.isascii() else f"&last_event_id={cursor}")
    stream = await SseClient.connect(client, query, headers=headers)
    try:
        assert await stream.message() == {"retry": "3000"}
        resets = [await stream.message(), await stream.message()]
        for fields in resets:
            assert set(fields) == {"data"}, fields  # a reset carries no id
        resets_data = sorted((orjson.loads(f["data"]) for f in resets), key=lambda r: r["channel"])
        assert resets_data == [
            {"op": "reset", "channel": "public:x", "offset": 1},
            {"op": "reset", "channel": "public:y", "offset": 0},
        ]
        cursor_fields = await stream.message()
        assert set(cursor_fields) == {"id"}
        assert decode_cursor(cursor_fields["id"], ("public:x", "public:y")) == {"public:x": 1, "public:y": 0}
        await publish(client, publisher, "public:y", "live")
        [(fields, event)] = await data_messages(stream, 1)
        assert (event["op"], event["channel"], event["offset"]) == ("event", "public:y", 1)
    finally:
        stream.close()


async def test_a_cursor_ahead_of_the_channel_resets_it(client, publisher):
    """A position the channel never reached (say, the database was restored from a backup)."""
    await publish(client, publisher, "public:back", 1)
    stream = await SseClient.connect(client, "channel=public:back")
    try:
        await opening(stream)
        await publish_many(client, publisher, "public:back", [2, 3])
        await stream.events(2)
        future_id = stream.last_id.replace("-3", "-7")
    finally:
        stream.close()
    resumed = await SseClient.connect(client, "channel=public:back", headers={"Last-Event-ID": future_id})
    try:
        assert await resumed.data() == {"op": "reset", "channel": "public:back", "offset": 3}
        await publish(client, publisher, "public:back", 4)
        event = await resumed.data()
        assert (event["op"], event["offset"]) == ("event", 4)
    finally:
        resumed.close()


async def test_a_cursor_older_than_the_kept_history_resets_only_that_channel(make_client):
    client = await make_client({"events": {"history_size": 3, "prune_interval": 0.2}})
    publisher = await token_for(client, "pub", roles=("publisher",))
    await publish(client, publisher, "public:q", "q1")
    stream = await SseClient.connect(client, "channel=public:p&channel=public:q")
    try:
        cursor = await opening(stream)
    finally:
        stream.close()
    assert decode_cursor(cursor, ("public:p", "public:q")) == {"public:p": 0, "public:q": 1}
    await publish_many(client, publisher, "public:p", range(1, 11))
    await publish_many(client, publisher, "public:q", [2, 3])

    async def pruned():
        resp = await client.get("/api/channels/public:p/events", headers=bearer(publisher))
        items = (await resp.json())["items"]
        return offsets(items) == [8, 9, 10]

    await wait_for(pruned)

    resumed = await SseClient.connect(client, "channel=public:p&channel=public:q", headers={"Last-Event-ID": cursor})
    try:
        messages = [data for _, data in await data_messages(resumed, 3)]
        assert {"op": "reset", "channel": "public:p", "offset": 10} in messages
        replayed = [m for m in messages if m["op"] == "event"]
        assert [(e["channel"], e["data"]) for e in replayed] == [("public:q", {"n": 2}), ("public:q", {"n": 3})]
        await publish(client, publisher, "public:p", "live")
        [(_, event)] = await data_messages(resumed, 1)
        assert (event["op"], event["channel"], event["offset"], event["data"]) == ("event", "public:p", 11, "live")
        assert decode_cursor(resumed.last_id, ("public:p", "public:q")) == {"public:p": 11, "public:q": 3}
    finally:
        resumed.close()


# keep-alive and disconnects


async def test_a_ping_comment_keeps_an_idle_stream_alive(make_client):
    client = await make_client({"realtime": {"sse_ping": 0.3}})
    stream = await SseClient.connect(client, "channel=public:idle")
    try:
        await opening(stream)
        deadline = time.monotonic() + 5
        pings = 0
        while pings < 2:
            fields = await stream.message(timeout=max(0.1, deadline - time.monotonic()))
            assert fields == {"": "ping"}, fields
            pings += 1
    finally:
        stream.close()


async def test_a_client_that_left_is_detached_at_the_next_ping(make_production_client):
    client = await make_production_client({"realtime": {"sse_ping": 0.2}})
    hub = client.app[hub_key]
    stream = await SseClient.connect(client, "channel=public:gone")
    await opening(stream)
    assert len(hub.connections) == 1
    assert hub.counts() == {"public:gone": 1}
    stream.close()
    await wait_for(lambda: not hub.connections and not hub.counts(), timeout=5)


async def test_a_client_that_left_is_detached_at_the_next_event_without_write_warnings(make_production_client, caplog):
    client = await make_production_client()  # the ping is 15 s away
    hub = client.app[hub_key]
    token = await token_for(client, "pub", roles=("publisher",))
    stream = await SseClient.connect(client, "channel=public:left")
    await opening(stream)
    stream.close()
    for n in range(12):
        await publish(client, token, "public:left", n)
    await wait_for(lambda: not hub.connections and not hub.counts(), timeout=2)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_graceful_shutdown_ends_an_open_stream(client, publisher):
    stream = await SseClient.connect(client, "channel=public:bye")
    await opening(stream)
    await close_connections(client.app)
    try:
        rest = await asyncio.wait_for(stream.response.content.read(), DEADLINE)  # returns at EOF only
        assert rest == b""
        assert stream.response.content.at_eof()
    finally:
        stream.close()
    await wait_for(lambda: not client.app[hub_key].connections, timeout=5)


async def test_server_shutdown_ends_open_streams_without_waiting_on_them(settings):
    server = ProductionLikeServer(create_app(settings))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            resp = await session.get(server.make_url("/sse?channel=public:down"))
            stream = SseClient(resp)
            try:
                await opening(stream)
                started = time.monotonic()
                shutdown = asyncio.create_task(server.close())
                assert await asyncio.wait_for(resp.content.read(), DEADLINE) == b""
                await asyncio.wait_for(shutdown, DEADLINE)
                assert time.monotonic() - started < 5
            finally:
                stream.close()
    finally:
        await server.close()


# refusals before the stream starts


async def test_channel_count_limit(client):
    allowed = "&".join(f"channel=public:c{i}" for i in range(32))
    resp = await client.get(f"/sse?{allowed}&channel=public:c32")
    body = await assert_problem(resp, 422, "validation_error")
    assert body["errors"][0]["field"] == "channel"
    assert not client.app[hub_key].connections
    stream = await SseClient.connect(client, allowed)
    try:
        await opening(stream)
        assert len(client.app[hub_key].counts()) == 32
    finally:
        stream.close()


@pytest.mark.parametrize(
    "query",
    ["", "other=1", "channel=", "channel=bad%20name", "channel=public:ok&channel=a/b", f"channel={'x' * 129}"],
)
async def test_missing_or_invalid_channels_are_422(client, query):
    await assert_problem(await client.get(f"/sse?{query}"), 422, "validation_error")


async def test_permissions_are_checked_before_the_stream_starts(client):
    resp = await client.get("/sse?channel=public:ok&channel=secret:x")
    await assert_problem(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    subscriber = await token_for(client, "sub")
    await assert_problem(await client.get("/sse?channel=secret:x", headers=bearer(subscriber)), 403, "forbidden")
    await assert_problem(await client.get(f"/sse?channel=secret:x&access_token={subscriber}"), 403, "forbidden")
    await assert_problem(await client.get("/sse?channel=public:ok&access_token=not.a.jwt"), 401, "unauthorized")
    await assert_problem(
        await client.get("/sse?channel=public:ok", headers={"Authorization": "Bearer nope"}), 401, "unauthorized"
    )
    assert not client.app[hub_key].connections


async def test_access_token_in_the_query_opens_an_admin_stream(client):
    admin = await token_for(client, "root", roles=("admin",))
    stream = await SseClient.connect(client, f"channel=secret:x&access_token={admin}")
    try:
        await opening(stream)
        event = await publish(client, admin, "secret:x", {"top": "secret"})
        assert await stream.data() == {"op": "event", **event}
    finally:
        stream.close()
