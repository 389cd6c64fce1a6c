"""The hard delivery guarantees: no loss or duplicate across a database restart, across
processes sharing one database, and no subscriber delayed by a slow one (ARCHITECTURE.md,
"Life of an event")."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import struct
import time

import orjson

from server.app import create_app
from server.keys import hub_key
from tests.conftest import wait_for
from tests.helpers import SseClient, WsClient, bearer, publish, token_for

DEADLINE = 10.0


async def subscribers(client, channel: str) -> tuple[WsClient, SseClient]:
    """A WebSocket and an SSE stream, both following `channel` live."""
    ws = await WsClient.connect(client)
    await ws.subscribe(channel)
    sse = await SseClient.connect(client, f"channel={channel}")
    assert await sse.message() == {"retry": "3000"}
    assert set(await sse.message()) == {"id"}
    return ws, sse


async def close_all(ws: WsClient, sse: SseClient) -> None:
    sse.close()
    await ws.ws.close()


async def received(ws: WsClient, sse: SseClient, count: int) -> tuple[list, list]:
    """The next `count` events on each transport, as (offset, data) pairs."""
    ws_events, sse_events = await asyncio.gather(ws.events(count), sse.events(count))
    return [(e["offset"], e["data"]) for e in ws_events], [(e["offset"], e["data"]) for e in sse_events]


async def ready(client) -> bool:
    return (await client.get("/readyz")).status == 200


async def publish_until_stored(client, token: str, channel: str, data, timeout: float = 30.0) -> dict:
    """Publish, retrying while the database is unavailable (503); anything else fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        resp = await client.post(f"/api/channels/{channel}/events", json={"data": data}, headers=bearer(token))
        if resp.status == 201:
            return await resp.json()
        assert resp.status == 503, await resp.text()
        assert time.monotonic() < deadline, "the database did not come back"
        await asyncio.sleep(0.05)


# a database restart


async def test_a_database_restart_loses_and_duplicates_nothing(make_client, postgres):
    postgres.require_embedded()
    client = await make_client({"realtime": {"sse_ping": 0.3}})
    token = await token_for(client, "pub", roles=("publisher",))
    ws, sse = await subscribers(client, "public:restart")
    try:
        for n in range(1, 11):
            await publish(client, token, "public:restart", n)
        expected = [(n, n) for n in range(1, 11)]
        assert await received(ws, sse, 10) == (expected, expected)

        postgres.stop()
        try:
            resp = await client.post("/api/channels/public:restart/events", json={"data": 0}, headers=bearer(token))
            assert resp.status == 503, await resp.text()
            body = await resp.json()
            assert body["code"] == "unavailable"
            # Both subscribers stay connected: the WebSocket answers, the SSE stream keeps pinging.
            assert (await ws.request("ping"))["op"] == "pong"
            assert await sse.message(timeout=5) == {"": "ping"}
            assert not ws.ws.closed
            # New subscriptions fail softly: a WebSocket error reply; an SSE stream that ends
            # right after `retry` (a 503 would make EventSource give up instead of reconnecting).
            reply = await ws.request("subscribe", channel="public:other")
            assert (reply["op"], reply["code"]) == ("error", "unavailable")
            resp = await client.get("/sse?channel=public:other")
            assert resp.status == 200
            assert await asyncio.wait_for(resp.content.read(), DEADLINE) == b"retry: 3000\n\n"
        finally:
            postgres.start()
        await wait_for(lambda: ready(client), timeout=30)

        for n in range(11, 21):
            await publish(client, token, "public:restart", n)
        expected = [(n, n) for n in range(11, 21)]
        assert await received(ws, sse, 10) == (expected, expected)
        # Nothing more was queued behind them: the next event is the next one.
        await publish(client, token, "public:restart", 21)
        assert await received(ws, sse, 1) == ([(21, 21)], [(21, 21)])
    finally:
        await close_all(ws, sse)


async def test_events_committed_elsewhere_while_the_listener_was_down_are_delivered(
    make_client, make_settings, aiohttp_client, postgres
):
    postgres.require_embedded()
    client = await make_client({"realtime": {"sse_ping": 0.3}})
    other = await aiohttp_client(create_app(make_settings()))  # another process's pool, listener and hub
    token = await token_for(client, "pub", roles=("publisher",))
    ws, sse = await subscribers(client, "public:elsewhere")
    try:
        for n in range(1, 4):
            await publish(client, token, "public:elsewhere", n)
        expected = [(n, n) for n in range(1, 4)]
        assert await received(ws, sse, 3) == (expected, expected)

        postgres.stop()
        try:
            assert (await ws.request("ping"))["op"] == "pong"
        finally:
            postgres.start()
        # Straight away, while this app's listener is most likely still reconnecting.
        for n in range(4, 14):
            await publish_until_stored(other, token, "public:elsewhere", n)
        expected = [(n, n) for n in range(4, 14)]
        assert await received(ws, sse, 10) == (expected, expected)

        await wait_for(lambda: ready(client), timeout=30)
        await publish(client, token, "public:elsewhere", 14)
        assert await received(ws, sse, 1) == ([(14, 14)], [(14, 14)])
    finally:
        await close_all(ws, sse)


# several processes on one database


async def test_events_published_through_another_app_reach_this_apps_subscribers(client, make_settings, aiohttp_client):
    other = await aiohttp_client(create_app(make_settings()))
    token = await token_for(client, "pub", roles=("publisher",))
    ws, sse = await subscribers(client, "public:cross")
    other_ws, other_sse = await subscribers(other, "public:cross")
    try:
        for n in range(1, 21):
            await publish(other if n % 3 else client, token, "public:cross", n)
        expected = [(n, n) for n in range(1, 21)]
        assert await received(ws, sse, 20) == (expected, expected)
        assert await received(other_ws, other_sse, 20) == (expected, expected)
    finally:
        await close_all(ws, sse)
        await close_all(other_ws, other_sse)


# slow consumers


def masked_text_frame(payload: bytes) -> bytes:
    """A client-to-server WebSocket text frame: clients must mask (RFC 6455 §5.3)."""
    mask = os.urandom(4)
    length = len(payload)
    header = struct.pack("!BB", 0x81, 0x80 | length) if length < 126 else struct.pack("!BBH", 0x81, 0xFE, length)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def raw_request(client, request: bytes) -> tuple[socket.socket, bytes]:
    """Send a request on a plain TCP socket with a small receive buffer; read only the response head.

    Nothing is read after that: no asyncio stream sits on the socket draining it.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (client.host, client.port))
        await loop.sock_sendall(sock, request)
        head = b""
        async with asyncio.timeout(DEADLINE):
            while b"\r\n\r\n" not in head:
                chunk = await loop.sock_recv(sock, 1024)
                assert chunk, head
                head += chunk
    except BaseException:
        sock.close()
        raise
    return sock, head


async def closed_by_server(sock: socket.socket) -> bool:
    """Drain what the kernel holds for this socket until the server's close (FIN or RST) shows."""
    loop = asyncio.get_running_loop()
    try:
        while await loop.sock_recv(sock, 1 << 20):
            pass
    except ConnectionResetError:
        pass
    return True


async def never_reading_websocket(client, channel: str) -> socket.socket:
    key = base64.b64encode(os.urandom(16)).decode()
    sock, head = await raw_request(
        client,
        (
            f"GET /ws HTTP/1.1\r\nHost: {client.host}:{client.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode(),
    )
    assert head.startswith(b"HTTP/1.1 101 "), head
    frame = masked_text_frame(orjson.dumps({"op": "subscribe", "id": 1, "channel": channel}))
    await asyncio.get_running_loop().sock_sendall(sock, frame)
    return sock


async def never_reading_sse(client, channel: str) -> socket.socket:
    request = f"GET /sse?channel={channel} HTTP/1.1\r\nHost: {client.host}:{client.port}\r\n\r\n"
    sock, head = await raw_request(client, request.encode())
    assert head.startswith(b"HTTP/1.1 200 "), head
    return sock


async def test_a_slow_consumer_is_closed_and_never_delays_the_others(make_client, caplog):
    client = await make_client({"realtime": {"outbound_buffer": 65536}})
    hub = client.app[hub_key]
    channel = "public:firehose"
    token = await token_for(client, "pub", roles=("publisher",))
    # 300 events of 20 KB: 6 MB per subscriber. The limit counts only what waits in user
    # space; the kernel's autotuned send buffer (tcp_wmem, 4 MB here) absorbs about 3 MB
    # per stalled socket first, so ~300 x 8 KB would never reach the limit.
    count, padding = 300, "x" * 20000
    fast = await WsClient.connect(client)
    await fast.subscribe(channel)
    slow = [await never_reading_websocket(client, channel), await never_reading_sse(client, channel)]
    last_received_at = 0.0

    async def read_fast() -> list[int]:
        nonlocal last_received_at
        seen = []
        while len(seen) < count:
            [event] = await fast.events(1)
            assert event["data"]["pad"] == padding
            seen.append(event["data"]["n"])
            last_received_at = time.monotonic()
        return seen

    reader = None
    try:

        def all_live() -> bool:
            subs = hub.channels.get(channel, {})
            return len(subs) == 3 and all(sub.pending is None for sub in subs.values())

        await wait_for(all_live)
        reader = asyncio.create_task(read_fast())
        for n in range(count):
            await publish(client, token, channel, {"n": n, "pad": padding})
        last_published_at = time.monotonic()
        assert await asyncio.wait_for(reader, 30) == list(range(count))
        assert last_received_at - last_published_at < 3, "the fast subscriber was held up"

        await wait_for(lambda: hub.slow_closes == 2)
        assert [sub.conn for sub in hub.channels[channel].values()] == list(hub.connections)
        assert [conn.kind for conn in hub.connections] == ["ws"]
        assert (await fast.request("ping"))["op"] == "pong"
        # The server really lets go of both sockets (the WebSocket after its close timeout).
        async with asyncio.timeout(15):
            for sock in slow:
                await closed_by_server(sock)
    finally:
        if reader is not None:
            reader.cancel()
        for sock in slow:
            sock.close()
        await fast.ws.close()
    assert hub.slow_closes == 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
