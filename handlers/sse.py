"""GET /sse: Server-Sent Events with a resumable cursor (PROTOCOL §6)."""

from __future__ import annotations

import contextlib

import orjson
from aiohttp import web

from handlers.http import identity_of, realtime_slot
from server.errors import ValidationError
from server.identity.auth import Identity
from server.identity.permissions import check_permission
from server.keys import hub_key, rules_key, settings_key
from server.realtime.connections import SseConnection
from server.realtime.hub import Hub, Subscription
from server.realtime.wire import decode_cursor, sse_message
from server.storage.db import DATABASE_DOWN_ERRORS

RETRY = b"retry: 3000\n\n"


def requested_channels(request: web.Request, limit: int) -> tuple[str, ...]:
    channels = tuple(sorted(set(request.query.getall("channel", []))))
    if not channels:
        raise ValidationError.field("channel", "at least one channel is required")
    if len(channels) > limit:
        raise ValidationError.field("channel", f"at most {limit} channels per stream")
    return channels


async def sse(request: web.Request) -> web.StreamResponse:
    settings = request.app[settings_key].realtime
    channels = requested_channels(request, settings.sse_max_channels)
    identity = identity_of(request)
    for channel in channels:
        check_permission(identity, "subscribe", channel, request.app[rules_key])
    cursor = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    with realtime_slot(request, identity):  # 429 before the stream starts when a cap is full
        return await stream(request, identity, channels, cursor)


async def stream(
    request: web.Request, identity: Identity | None, channels: tuple[str, ...], cursor: str | None
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    if request.version >= (1, 1):
        response.enable_chunked_encoding()
    hub = request.app[hub_key]
    conn = SseConnection(hub, identity, response, request.transport, channels)
    # The client leaving, or the database going away, just ends the stream: the client resumes.
    with hub.attached(conn), contextlib.suppress(ConnectionError, *DATABASE_DOWN_ERRORS):
        # PROTOCOL §10a: the stream is open when the headers arrive, and every event committed
        # after that must reach it; so the starting positions are fixed before prepare(). Live
        # events meanwhile buffer in the subscriptions.
        try:
            subscriptions = await subscribe_all(hub, conn, channels, cursor)
        except DATABASE_DOWN_ERRORS:
            # Not a 503: EventSource gives up on one, and comes back after a stream that ends.
            await response.prepare(request)
            await conn.send(RETRY)
            raise
        await response.prepare(request)
        await start(hub, conn, subscriptions)
        await conn.done.wait()
    return response


async def subscribe_all(
    hub: Hub, conn: SseConnection, channels: tuple[str, ...], cursor: str | None
) -> list[tuple[Subscription, bytes | None]]:
    """Subscribe every channel where the cursor left it, or at its end with a `reset`."""
    positions = decode_cursor(cursor, channels)
    subscriptions = []
    for channel in channels:
        after = positions[channel] if positions is not None else None
        sub, resume = await hub.subscribe(conn, channel, after)
        reset = None
        if not resume.recovered or (cursor and positions is None):
            # The reset says where the channel now stands, so a client can fill the gap
            # from history (and carries no id: it moves no cursor by itself).
            reset = sse_message(orjson.dumps({"op": "reset", "channel": channel, "offset": resume.offset}))
            sub.last_sent = resume.offset
        conn.position(channel, sub.last_sent)
        subscriptions.append((sub, reset))
    return subscriptions


async def start(hub: Hub, conn: SseConnection, subscriptions: list[tuple[Subscription, bytes | None]]) -> None:
    """The stream's first lines (retry, resets, the cursor), then each channel's replay."""
    await conn.send(RETRY)
    for _, reset in subscriptions:
        if reset is not None:
            await conn.send(reset)
    await conn.send(f"id: {conn.cursor()}\n\n".encode())  # sets lastEventId, fires no message
    for sub, _ in subscriptions:
        await hub.replay(sub)
