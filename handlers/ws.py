"""GET /ws: the WebSocket protocol of PROTOCOL §5."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from handlers.http import decode_json, identity_of, realtime_slot
from server.errors import ApiError, BadRequest, Conflict, Forbidden, PayloadTooLarge, RateLimited, ValidationError
from server.events.store import validate_event
from server.identity.permissions import check_channel_name, check_permission, check_presence
from server.keys import authenticator_key, hub_key, limiter_key, presence_key, rules_key, settings_key, store_key
from server.limits.connections import Lease
from server.limits.limiter import bucket_key, refusal
from server.realtime.connections import WebSocketConnection
from server.storage.db import DATABASE_DOWN_ERRORS
from server.web.net import client_ip

log = logging.getLogger("herald.ws")

SCALARS = (str, int, float, bool, type(None))
MAX_REFUSED_IN_A_ROW = 10  # publishes refused by the rate limit before the connection is closed (4429)
# What a REST body holding only the event would add to its type and data: {"type":"","data":}
EVENT_BODY_OVERHEAD = len('{"type":"","data":}')


def frame(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    with realtime_slot(request, identity_of(request)) as lease:  # 429 before the upgrade when a cap is full
        return await serve_websocket(request, lease)


async def serve_websocket(request: web.Request, lease: Lease) -> web.WebSocketResponse:
    settings = request.app[settings_key].realtime
    # Pings come from the hub's one heartbeat loop (server/realtime/engine.py), not a timer per
    # socket: cheaper, and the pong gets the whole heartbeat that PROTOCOL §10 allows.
    ws = web.WebSocketResponse(
        autoping=False,
        compress=settings.compression,
        # aiohttp refuses a frame of exactly max_msg_size; PROTOCOL §10 accepts exactly the limit.
        max_msg_size=settings.max_frame_bytes + 1,
    )
    await ws.prepare(request)
    hub = request.app[hub_key]
    with hub.attached(WebSocketConnection(hub, identity_of(request), ws, request.transport)) as conn:
        session = Session(request, conn, lease)
        await conn.send_json(
            frame(
                {
                    "op": "welcome",
                    "connection": conn.id,
                    "user": conn.identity.public() if conn.identity else None,
                    "heartbeat": settings.heartbeat,
                }
            )
        )
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await session.handle(message.data)
            elif message.type == WSMsgType.PONG:
                conn.ponged()
            elif message.type == WSMsgType.PING:
                await ws.pong(message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.close(code=1003, message=b"binary frames are not supported")
    return ws


class Session:
    """One connection's ops. Errors become `error` replies; the connection stays open."""

    def __init__(self, request: web.Request, conn: WebSocketConnection, lease: Lease) -> None:
        self.app = request.app
        self.conn = conn
        self.lease = lease  # the connection's place under the connection caps
        self.ip = client_ip(request, self.app[settings_key].server.trusted_proxies)
        self.refused_in_a_row = 0
        self.json_depth = self.app[settings_key].limits.json_depth

    async def handle(self, text: str) -> None:
        message_id = None
        try:
            message = parse(text, self.json_depth)
            message_id = message.get("id")
            op = message.get("op")
            handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
            if handler is None:
                raise BadRequest(f"Unknown op {op!r}")
            await handler(message, message_id)
        except ApiError as exc:
            await self.reply_error(message_id, exc.code, exc.detail or exc.title)
        except DATABASE_DOWN_ERRORS:
            await self.reply_error(message_id, "unavailable", "The database is unavailable; try again shortly")
        except Exception:
            # A bug must cost one reply, never the connection's message loop (PROTOCOL §10: it stays open).
            log.exception("unhandled error in a WebSocket op", extra={"connection": self.conn.id})
            await self.reply_error(message_id, "internal_error", "An internal error occurred")

    async def reply(self, message_id: Any, op: str = "ok", **fields: Any) -> None:
        await self.conn.send_json(frame({"op": op, "id": message_id, **fields}))

    async def reply_error(self, message_id: Any, code: str, detail: str) -> None:
        await self.reply(message_id, "error", code=code, message=detail)

    async def op_ping(self, message: dict[str, Any], message_id: Any) -> None:
        await self.reply(message_id, "pong")

    async def op_auth(self, message: dict[str, Any], message_id: Any) -> None:
        token = message.get("token")
        if not isinstance(token, str):
            raise ValidationError.field("token", "is required and must be a string")
        identity = await self.app[authenticator_key].identity_for(token, via="ws")
        if self.conn.identity is not None and self.conn.identity.id != identity.id:
            raise Forbidden("A connection cannot change its user")
        cap = self.app[settings_key].limits.connections_per_identity
        if not self.lease.add_identity(identity.id, cap):
            raise RateLimited(f"Too many open connections for this identity (at most {cap}); close one first")
        self.conn.set_identity(identity)
        await self.reply(message_id, user=identity.public())

    async def op_subscribe(self, message: dict[str, Any], message_id: Any) -> None:
        channel = message.get("channel")
        check_permission(self.conn.identity, "subscribe", channel, self.app[rules_key])
        after = message.get("offset")
        if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 0):
            raise ValidationError.field("offset", "must be a non-negative integer")
        if channel in self.conn.subscriptions:
            raise Conflict(f"Already subscribed to {channel}")
        cap = self.app[settings_key].limits.channels_per_connection
        if len(self.conn.subscriptions) >= cap:
            raise ValidationError.field("channel", f"at most {cap} channels per connection; unsubscribe one first")
        self.check_rate("Too many subscribes")
        hub = self.app[hub_key]
        sub, resume = await hub.subscribe(self.conn, channel, after)
        await self.reply(message_id, channel=channel, offset=resume.offset, recovered=resume.recovered)
        # Replay runs beside the reader loop, so pongs and other ops keep flowing meanwhile.
        self.conn.spawn(self.replay(sub, message_id))

    async def replay(self, sub, message_id: Any) -> None:
        try:
            await self.app[hub_key].replay(sub)
        except DATABASE_DOWN_ERRORS:
            self.app[hub_key].unsubscribe(self.conn, sub.channel)
            await self.reply_error(message_id, "unavailable", f"Replay of {sub.channel} failed; subscribe again")

    async def op_unsubscribe(self, message: dict[str, Any], message_id: Any) -> None:
        channel = message.get("channel")
        check_channel_name(channel)  # as subscribe does (PROTOCOL §10 §3)
        self.app[hub_key].unsubscribe(self.conn, channel)
        await self.reply(message_id, channel=channel)

    async def op_presence(self, message: dict[str, Any], message_id: Any) -> None:
        channel = message.get("channel")
        check_presence(self.conn.identity, channel, self.app[rules_key])
        body = await self.app[presence_key].members(channel)
        await self.conn.send_json(b'{"op":"ok","id":' + orjson.dumps(message_id) + b"," + body[1:])

    def check_rate(self, what: str = "Too many publishes") -> None:
        """WebSocket publishes and subscribes draw on the same bucket as the caller's REST requests."""
        limits = self.app[settings_key].limits
        decision = self.app[limiter_key].take_request(limits, bucket_key(self.conn.identity, self.ip))
        if decision is None or decision.allowed:
            self.refused_in_a_row = 0
            return
        self.refused_in_a_row += 1
        if self.refused_in_a_row > MAX_REFUSED_IN_A_ROW:
            self.conn.close(4429, "rate limited")
        raise refusal(decision, what)

    async def op_publish(self, message: dict[str, Any], message_id: Any) -> None:
        channel = message.get("channel")
        check_permission(self.conn.identity, "publish", channel, self.app[rules_key])
        self.check_rate()
        event_type, data = validate_event({k: v for k, v in message.items() if k in ("type", "data")})
        limit = self.app[settings_key].limits.body_bytes
        if EVENT_BODY_OVERHEAD + len(event_type) + len(data.encode()) > limit:
            raise PayloadTooLarge(f"The event is larger than {limit} bytes (limits.body_bytes, as over REST)")
        event, _ = await self.app[store_key].publish(channel, event_type, data)
        await self.conn.send_json(
            b'{"op":"ok","id":' + orjson.dumps(message_id) + b',"event":' + event.json.encode() + b"}"
        )


def parse(text: str, max_depth: int) -> dict[str, Any]:
    message = decode_json(text, max_depth)
    if not isinstance(message, dict):
        raise BadRequest("A message must be a JSON object with an op")
    message_id = message.get("id")
    if not isinstance(message_id, SCALARS):
        raise BadRequest("id must be a JSON scalar")
    try:
        orjson.dumps(message_id)  # echoed in the reply: a lone surrogate or a huge integer could not be
    except orjson.JSONEncodeError:
        raise BadRequest("id must be a string of valid Unicode or a 64-bit number") from None
    return message
