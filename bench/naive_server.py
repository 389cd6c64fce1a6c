"""The baseline of the fan-out benchmark: a naive aiohttp broadcast server.

It has Herald's wire shape for what the bench uses (publish over REST, the
WebSocket ops, the SSE stream) and nothing else: no database, no auth, offsets
from an in-memory counter. Its fan-out is the loop most tutorials show: for
each subscriber, serialise the event and await the send, one after another,
inside the publishing request.

Run with `python -m bench.naive_server --port P`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections import defaultdict
from datetime import UTC, datetime

from aiohttp import WSMsgType, web

HEARTBEAT = 25
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Broker:
    """Per-channel offsets and subscribers of this one process."""

    def __init__(self) -> None:
        self.offsets: defaultdict[str, int] = defaultdict(int)
        self.websockets: defaultdict[str, set[web.WebSocketResponse]] = defaultdict(set)
        self.streams: defaultdict[str, set[web.StreamResponse]] = defaultdict(set)

    def store(self, channel: str, event_type: str, data: object) -> dict:
        self.offsets[channel] += 1
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {"channel": channel, "offset": self.offsets[channel], "type": event_type, "data": data, "time": now}

    async def fan_out(self, event: dict) -> None:
        frame = {"op": "event", **event}
        channel = event["channel"]
        for ws in list(self.websockets[channel]):
            try:
                await ws.send_str(json.dumps(frame))
            except ConnectionError:
                self.websockets[channel].discard(ws)
        for stream in list(self.streams[channel]):
            try:
                await stream.write(f"data: {json.dumps(frame)}\n\n".encode())
            except ConnectionError:
                self.streams[channel].discard(stream)


BROKER_KEY = web.AppKey("broker_key", Broker)


async def publish(request: web.Request) -> web.Response:
    body = await request.json()
    broker = request.app[BROKER_KEY]
    event = broker.store(request.match_info["channel"], body.get("type", "message"), body.get("data"))
    await broker.fan_out(event)
    return web.json_response(event, status=201)


async def publish_batch(request: web.Request) -> web.Response:
    """POST /api/events in memory: the baseline of Herald's batch publish."""
    body = await request.json()
    broker = request.app[BROKER_KEY]
    items = []
    for item in body["events"]:
        event = broker.store(item["channel"], item.get("type", "message"), item.get("data"))
        await broker.fan_out(event)
        items.append(event)
    return web.json_response({"items": items}, status=201)


def answer(broker: Broker, ws: web.WebSocketResponse, channels: set[str], message: dict) -> dict:
    """The reply to one client op; subscriptions are recorded in `channels` and the broker."""
    op, reply = message.get("op"), {"op": "ok", "id": message.get("id")}
    if op == "subscribe":
        channel = message["channel"]
        channels.add(channel)
        broker.websockets[channel].add(ws)
        return reply | {"channel": channel, "offset": broker.offsets[channel], "recovered": True}
    if op == "unsubscribe":
        channels.discard(message["channel"])
        broker.websockets[message["channel"]].discard(ws)
        return reply
    if op == "ping":
        return {"op": "pong", "id": message.get("id")}
    return {"op": "error", "id": message.get("id"), "code": "bad_request", "message": f"unknown op {op!r}"}


async def websocket(request: web.Request) -> web.WebSocketResponse:
    broker = request.app[BROKER_KEY]
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT, compress=False)
    await ws.prepare(request)
    await ws.send_json({"op": "welcome", "connection": uuid.uuid4().hex, "user": None, "heartbeat": HEARTBEAT})
    channels: set[str] = set()
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_json(answer(broker, ws, channels, json.loads(msg.data)))
    finally:
        for channel in channels:
            broker.websockets[channel].discard(ws)
    return ws


async def sse(request: web.Request) -> web.StreamResponse:
    broker = request.app[BROKER_KEY]
    channels = request.query.getall("channel", [])
    if not channels:
        raise web.HTTPUnprocessableEntity(text="channel is required")
    stream = web.StreamResponse(headers=SSE_HEADERS)
    await stream.prepare(request)
    await stream.write(b"retry: 3000\n\n")
    for channel in channels:
        broker.streams[channel].add(stream)
    try:
        await asyncio.Future()  # until the client leaves: the app runs with handler_cancellation
    finally:
        for channel in channels:
            broker.streams[channel].discard(stream)
    return stream


async def readyz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app() -> web.Application:
    app = web.Application()
    app[BROKER_KEY] = Broker()
    app.router.add_post("/api/channels/{channel}/events", publish)
    app.router.add_post("/api/events", publish_batch)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/sse", sse)
    app.router.add_get("/readyz", readyz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="Naive aiohttp broadcast server (fan-out baseline).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(
        create_app(),
        host=args.host,
        port=args.port,
        handler_cancellation=True,
        access_log=None,
        print=None,
        shutdown_timeout=2,
    )


if __name__ == "__main__":
    main()
