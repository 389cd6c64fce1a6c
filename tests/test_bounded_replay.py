"""History pages and replays bounded by bytes as well as count, read a chunk at a time,
with a per-worker replay budget and the slow-consumer close during replay (issue 11)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket

import orjson

from server.keys import hub_key, store_key
from server.realtime.hub import REPLAY_CHUNK_BYTES
from tests.conftest import wait_for
from tests.helpers import WsClient

DEADLINE = 20.0
BIG = "x" * 60_000  # the red team's ~60 KB events


async def store_events(client, channel: str, count: int, data) -> None:
    store = client.app[store_key]
    for _ in range(count):
        await store.publish(channel, "message", orjson.dumps(data).decode())


async def test_a_history_page_stops_at_page_bytes_and_the_next_page_goes_on_without_a_gap(make_client):
    client = await make_client({"events": {"page_bytes": 1000}})
    await store_events(client, "public:big", 10, "y" * 300)
    resp = await client.get("/api/channels/public:big/events?limit=100")
    assert resp.status == 200
    assert resp.headers.get("Transfer-Encoding") == "chunked"  # streamed, not built whole
    page = orjson.loads(await resp.read())
    # 302 bytes of data each: the page takes events while the data before them is under 1000
    assert [e["offset"] for e in page["items"]] == [1, 2, 3, 4]
    assert page["next"] == 4
    seen = [e["offset"] for e in page["items"]]
    while page["next"] is not None:
        resp = await client.get(f"/api/channels/public:big/events?limit=100&after={page['next']}")
        page = orjson.loads(await resp.read())
        seen += [e["offset"] for e in page["items"]]
    assert seen == list(range(1, 11))


async def test_a_single_event_larger_than_page_bytes_still_comes_back(make_client):
    client = await make_client({"events": {"page_bytes": 100}})
    await store_events(client, "public:big", 2, "y" * 500)
    page = orjson.loads(await (await client.get("/api/channels/public:big/events")).read())
    assert ([e["offset"] for e in page["items"]], page["next"]) == ([1], 1)


async def test_a_long_page_is_read_a_chunk_at_a_time(make_client):
    client = await make_client({"events": {"page_bytes": 4 << 20}})
    await store_events(client, "public:big", 20, BIG)  # 1.2 MB: more than one chunk
    store = client.app[store_key]
    calls = []
    real = store.history_chunk

    async def counting(*args):
        calls.append(args[3])
        return await real(*args)

    store.history_chunk = counting
    page = orjson.loads(await (await client.get("/api/channels/public:big/events?limit=1000")).read())
    assert [e["offset"] for e in page["items"]] == list(range(1, 21))
    assert page["next"] is None
    assert len(calls) > 1  # chunks
    assert all(budget <= REPLAY_CHUNK_BYTES for budget in calls)


async def raw_websocket_that_never_reads(client) -> asyncio.StreamWriter:
    """A WebSocket whose client reads its handshake answer and then nothing: aiohttp's own
    client would keep reading into memory in the background."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (client.host, client.port))
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return writer


def masked_text_frame(payload: bytes) -> bytes:
    assert len(payload) < 126
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_a_replay_the_client_does_not_read_closes_it_as_slow_and_frees_the_replay_budget(make_client):
    """max_replays = 1: a stalled replay holds the budget until the stall closes it (4008)."""
    client = await make_client({"realtime": {"max_replays": 1, "heartbeat": 3600}})  # no ping closes it first
    hub = client.app[hub_key]
    hub.replay_stall = 3.0  # a write not drained in 3 s: slow consumer
    await store_events(client, "public:big", 200, BIG)  # 12 MB: more than loopback buffers hold
    stalled = await raw_websocket_that_never_reads(client)
    try:
        subscribe = orjson.dumps({"op": "subscribe", "id": 1, "channel": "public:big", "offset": 0})
        stalled.write(masked_text_frame(subscribe))
        await wait_for(hub.replays.locked, timeout=DEADLINE)  # its replay holds the budget, blocked on the socket
        waiting = await WsClient.connect(client, max_msg_size=0)
        await waiting.subscribe("public:big", offset=198)  # this replay waits for the budget...
        events = await waiting.events(2, timeout=DEADLINE)
        assert hub.slow_closes == 1  # ...which only the slow-consumer close of the stalled one freed
        assert [e["offset"] for e in events] == [199, 200]
    finally:
        stalled.transport.abort()
