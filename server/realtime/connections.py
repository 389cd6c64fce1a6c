"""Live connections as the hub sees them: a WebSocket or an SSE stream.

deliver() is the hot path: one synchronous transport.write of bytes shared by every
subscriber, then a look at the transport's backlog. Everything else (replies, replay,
closing) goes through aiohttp's own writers, which pace themselves.

Once a transport holds more than the hub's soft limit unsent, further events wait in the
connection's own backlog, which a flusher feeds to the transport as it drains. So when the
connection is judged slow, what is still in Herald's hands is dropped at once and the 4008
close frame goes right behind the little the transport holds: the client gets it promptly
once it reads again, instead of after a megabyte of stale events (or never: the close
used to be aborted 5 s later).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import struct
import time
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import WSMsgType, web

from server.events.store import StoredEvent
from server.identity.auth import Identity
from server.realtime.wire import (
    EncodedEvent,
    EncodedNotice,
    channel_set_tag,
    encode_cursor,
    event_payload,
    http_chunk,
    sse_message,
)

if TYPE_CHECKING:
    from server.realtime.hub import Hub, Subscription

CLOSE_TIMEOUT = 5.0
SLOW_CLOSE_TIMEOUT = 60.0  # a slow client gets this long to read up to its 4008 before the abort
FLUSH_POLL = 0.01  # how often a backlogged connection looks whether its transport drained
SSE_PING = b": ping\n\n"
SSE_PING_CHUNK = http_chunk(SSE_PING)
PING_FRAME = b"\x89\x00"  # a WebSocket ping with no payload, the same bytes for everyone


class Connection:
    kind = "connection"
    __slots__ = (
        "__weakref__",
        "_backlog",
        "_backlog_bytes",
        "_expiry",
        "_flusher",
        "_tasks",
        "closed",
        "hub",
        "id",
        "identity",
        "subscriptions",
        "transport",
    )

    def __init__(self, hub: Hub, identity: Identity | None, transport: asyncio.Transport) -> None:
        self.hub = hub
        self.id = secrets.token_hex(8)
        self.identity = identity
        self.transport = transport
        self.subscriptions: dict[str, Subscription] = {}
        self.closed = False
        self._tasks: set[asyncio.Task[Any]] | None = None  # made on first use: most never need one
        self._expiry: asyncio.TimerHandle | None = None
        self._backlog: deque[bytes] | None = None  # events waiting for the transport to drain
        self._backlog_bytes = 0
        self._flusher: asyncio.Task[None] | None = None
        self._watch_expiry()

    def set_identity(self, identity: Identity) -> None:
        self.identity = identity
        self._watch_expiry()

    def _watch_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        expires = self.identity.expires if self.identity is not None else None
        if expires is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, expires - time.time())
            self._expiry = loop.call_at(loop.time() + delay, self.close, 4401, "token expired")

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task tied to this connection: kept referenced, cancelled when it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _check_backlog(self) -> None:
        if self.transport.get_write_buffer_size() + self._backlog_bytes > self.hub.outbound_limit:
            self.hub.close_slow(self)

    def _write(self, data: bytes) -> None:
        """Straight to the transport while it keeps up; past the soft limit, into the backlog."""
        if self._backlog is None and self.transport.get_write_buffer_size() < self.hub.soft_limit:
            self.transport.write(data)
            return
        if self._backlog is None:
            self._backlog = deque()
        self._backlog.append(data)
        self._backlog_bytes += len(data)
        if self._flusher is None:
            self._flusher = self.spawn(self._flush())

    async def _flush(self) -> None:
        try:
            while self._backlog:
                if self.transport.is_closing():
                    return
                if self.transport.get_write_buffer_size() >= self.hub.soft_limit:
                    await asyncio.sleep(FLUSH_POLL)
                    continue
                data = self._backlog.popleft()
                self._backlog_bytes -= len(data)
                self.transport.write(data)
            self._backlog = None  # drained: the hot path writes directly again, in order
        finally:
            self._flusher = None

    def _drop_backlog(self) -> None:
        """Judged slow: what Herald still holds for it is never sent."""
        if self._flusher is not None:
            self._flusher.cancel()
        self._backlog = None
        self._backlog_bytes = 0

    def ended(self) -> None:
        """The handler is leaving: stop timers and tasks."""
        self.closed = True
        if self._expiry is not None:
            self._expiry.cancel()
        for task in list(self._tasks or ()):
            if task is not asyncio.current_task():
                task.cancel()

    def deliver(self, sub: Subscription, event: EncodedEvent) -> None:
        raise NotImplementedError

    async def send_replayed(self, sub: Subscription, event: StoredEvent) -> None:
        raise NotImplementedError

    def send_notice(self, notice: EncodedNotice) -> None:
        raise NotImplementedError

    def close(self, code: int, reason: str) -> None:
        raise NotImplementedError

    def close_slow(self) -> None:
        self.close(4008, "slow consumer")

    def subscription_forbidden(self, channel: str) -> None:
        """The identity may no longer follow `channel` (the hub already dropped it)."""
        raise NotImplementedError


class WebSocketConnection(Connection):
    kind = "ws"
    __slots__ = ("awaiting_pong", "ws")

    def __init__(self, hub: Hub, identity: Identity | None, ws: web.WebSocketResponse, transport) -> None:
        self.ws = ws
        self.awaiting_pong = False
        super().__init__(hub, identity, transport)

    def heartbeat(self) -> None:
        """One beat: close if the last ping went unanswered for a whole heartbeat, else ping."""
        if self.closed:
            return
        if self.awaiting_pong:
            self.close(1000, "no pong within the heartbeat")
            return
        self.awaiting_pong = True
        self.transport.write(PING_FRAME)

    def ponged(self) -> None:
        self.awaiting_pong = False

    def deliver(self, sub: Subscription, event: EncodedEvent) -> None:
        self._write(event.ws_frame)
        sub.last_sent = event.offset
        self._check_backlog()

    async def send_replayed(self, sub: Subscription, event: StoredEvent) -> None:
        await self.ws.send_frame(event_payload(event.json.encode()), WSMsgType.TEXT)

    def send_notice(self, notice: EncodedNotice) -> None:
        self._write(notice.ws_frame)  # behind any events still in the backlog, never ahead of them
        self._check_backlog()

    async def send_json(self, message: bytes) -> None:
        if not self.closed:
            await self.ws.send_frame(message, WSMsgType.TEXT)

    def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.spawn(self._close(code, reason))

    def subscription_forbidden(self, channel: str) -> None:
        """An `error` naming the channel; the connection and its other subscriptions stay."""
        message = {
            "op": "error",
            "id": None,
            "code": "forbidden",
            "channel": channel,
            "message": f"You may no longer subscribe to {channel}; the subscription ended",
        }
        self.spawn(self.send_json(orjson.dumps(message)))

    async def _close(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code=code, message=reason.encode())
        except (TimeoutError, ConnectionError):
            self.transport.abort()

    def close_slow(self) -> None:
        """Drop the backlog and put the 4008 frame right behind what the transport holds; the
        transport closes once it has handed everything to the kernel (the client reads it
        all, then the close), or is aborted if the client never reads again."""
        if self.closed:
            return
        self.closed = True
        self._drop_backlog()
        if self.transport.is_closing():
            return
        self.transport.write(close_frame(4008, b"slow consumer"))
        self.transport.close()  # flushes first, then FIN
        loop = asyncio.get_running_loop()
        loop.call_later(SLOW_CLOSE_TIMEOUT, self.transport.abort)


class SseConnection(Connection):
    """An SSE stream; its cursor (`id:`) holds its position in every channel it follows."""

    kind = "sse"
    __slots__ = ("_index", "_tag", "chunked", "done", "positions", "response")

    def __init__(
        self, hub: Hub, identity: Identity | None, response: web.StreamResponse, transport, channels: tuple[str, ...]
    ) -> None:
        self.response = response
        self.chunked = response.chunked
        self.done = asyncio.Event()
        self.positions = [0] * len(channels)
        self._index = {channel: i for i, channel in enumerate(channels)}
        self._tag = channel_set_tag(channels)
        super().__init__(hub, identity, transport)

    def cursor(self) -> str:
        return encode_cursor(self._tag, self.positions)

    def position(self, channel: str, offset: int) -> None:
        self.positions[self._index[channel]] = offset

    def deliver(self, sub: Subscription, event: EncodedEvent) -> None:
        if self.transport.is_closing():
            # The client left: every write is a disconnect probe, not only the ping (and
            # asyncio logs a warning for each write to a lost connection).
            self.close(1000, "client left")
            return
        self.position(event.channel, event.offset)
        if len(self.positions) == 1 and self.chunked:
            data = event.single_channel_sse_chunk()
        else:
            data = sse_message(event.sse_data, self.cursor())
            if self.chunked:
                data = http_chunk(data)
        self._write(data)
        sub.last_sent = event.offset
        self._check_backlog()

    async def send_replayed(self, sub: Subscription, event: StoredEvent) -> None:
        self.position(event.channel, event.offset)
        await self.response.write(sse_message(event_payload(event.json.encode()), self.cursor()))

    async def send(self, message: bytes) -> None:
        await self.response.write(message)

    def send_notice(self, notice: EncodedNotice) -> None:
        if self.transport is None or self.transport.is_closing():
            self.close(1000, "client left")
            return
        if not self.response.prepared:
            return  # still fixing its start before the headers (handlers/sse.py); notices are never replayed
        self._write(notice.sse_chunk if self.chunked else notice.sse_message)
        self._check_backlog()

    def ping(self) -> None:
        """The keep-alive comment, and the only way to learn that an idle client left."""
        if not self.response.prepared:
            return  # still fixing its starting positions: no headers sent yet (handlers/sse.py)
        if self.transport is None or self.transport.is_closing():
            self.close(1000, "client left")
            return
        self._write(SSE_PING_CHUNK if self.chunked else SSE_PING)
        self._check_backlog()

    def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.done.set()

    def close_slow(self) -> None:
        self._drop_backlog()
        self.close(4008, "slow consumer")
        with contextlib.suppress(Exception):
            self.transport.abort()

    def subscription_forbidden(self, channel: str) -> None:
        """A stream's channels are fixed: one it may no longer follow ends the stream."""
        self.close(4403, f"forbidden: {channel}")


def close_frame(code: int, reason: bytes) -> bytes:
    """A server's WebSocket close frame (unmasked; control frames are never compressed)."""
    payload = struct.pack("!H", code) + reason[:123]
    return bytes([0x88, len(payload)]) + payload
