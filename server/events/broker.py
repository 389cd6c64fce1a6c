"""LISTEN/NOTIFY: events committed by any process or host reach this process, in order.

One dedicated connection LISTENs (a pooled one would be reset with UNLISTEN). For
each channel this process serves, the broker remembers the last offset it handed to
the hub; a notification that skips ahead makes it read the gap from the table, and
after a lost connection it reads everything it missed before delivering anything new.
So the hub sees every committed event exactly once, in offset order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from server.events.store import EventStore, StoredEvent, events_channel, notification_head
from server.identity.users import USER_CHANGES_CHANNEL
from server.storage import db
from server.storage.db import DATABASE_DOWN_ERRORS

log = logging.getLogger("herald.broker")

BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0
GAP_PAGE = 1000


class Broker:
    def __init__(
        self,
        dsn: str,
        store: EventStore,
        deliver: Callable[[StoredEvent], None],
        on_user_change: Callable[[str], Awaitable[None]],
        schema: str = db.DEFAULT_SCHEMA,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.events_channel = events_channel(schema)
        self.store = store
        self.deliver = deliver
        self.on_user_change = on_user_change
        self.on_reconnect = on_reconnect  # state kept from user-change notices is re-read: some may be missed
        self.last: dict[str, int] = {}  # served channel -> last offset handed to the hub
        self._connected = asyncio.Event()
        self._queue: asyncio.Queue[tuple] = asyncio.Queue()
        self._ready: dict[str, asyncio.Future[None]] = {}
        self._lost = asyncio.Event()
        self._wake = asyncio.Event()
        self.retry_in = 0.0  # while disconnected: the backoff of the wait before the next attempt
        self.side_channels: dict[str, Callable[[str], None]] = {}  # other NOTIFY channels and their readers
        self.reconnected: list[Callable[[], None]] = []  # told after each (re)connect: notifications may be lost

    def listen_also(self, channel: str, on_payload: Callable[[str], None], on_reconnect: Callable[[], None]) -> None:
        """Another NOTIFY channel on the same LISTEN connection (presence): no second connection
        per process. Its payloads go straight to `on_payload`, outside the event queue."""
        self.side_channels[channel] = on_payload
        self.reconnected.append(on_reconnect)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, deadline: float) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), deadline)
        except TimeoutError:
            return False
        return True

    def wake(self) -> None:
        """The pool reached the database: reconnect now, not after a backoff grown during an
        outage (it reached seconds, and /readyz stayed 503 that long after the database was back)."""
        if not self.connected:
            self._wake.set()

    # what the hub asks

    async def serve(self, channel: str) -> None:
        """Start tracking a channel; returns once its starting offset is known."""
        future = self._ready.get(channel)
        if future is None:
            future = self._ready[channel] = asyncio.get_running_loop().create_future()
            self._queue.put_nowait(("serve", channel, future))
        await asyncio.shield(future)

    def release(self, channel: str) -> None:
        # A serve() after this waits for a fresh start, queued behind the release.
        self._ready.pop(channel, None)
        self._queue.put_nowait(("release", channel))

    # the two long-running jobs

    async def listen(self) -> None:
        """Keep a LISTEN connection up; after each reconnect, catch up on what was missed."""
        backoff = BACKOFF_FIRST
        while True:
            conn = None
            try:
                conn = await db.connect(self.dsn, self.schema)
                self._lost.clear()
                conn.add_termination_listener(lambda _: self._lost.set())
                await conn.add_listener(self.events_channel, self._on_notify)
                await conn.add_listener(USER_CHANGES_CHANNEL, self._on_notify)
                for name, on_payload in self.side_channels.items():
                    await conn.add_listener(name, side_listener(on_payload))
                self._queue.put_nowait(("catch_up",))
                for on_reconnect in self.reconnected:
                    on_reconnect()
                self._connected.set()
                backoff = BACKOFF_FIRST
                log.info("listening for events")
                await self._watch(conn)
            except asyncio.CancelledError:
                raise
            except DATABASE_DOWN_ERRORS as exc:
                log.warning("event listener disconnected: %s; retrying in %.1fs", type(exc).__name__, backoff)
            except Exception:
                log.exception("event listener failed; retrying in %.1fs", backoff)
            finally:
                self._connected.clear()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            self.retry_in = backoff
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _watch(self, conn: asyncpg.Connection) -> None:
        """Return when the connection is lost; a periodic probe catches silent deaths."""
        while not self._lost.is_set():
            try:
                await asyncio.wait_for(self._lost.wait(), timeout=5)
            except TimeoutError:
                await conn.fetchval("SELECT 1", timeout=5)

    async def process(self) -> None:
        """Handle notifications and requests one at a time, in arrival order."""
        while True:
            item = await self._queue.get()
            try:
                await self._handle(item)
            except asyncio.CancelledError:
                raise
            except DATABASE_DOWN_ERRORS as exc:
                log.warning("event delivery paused: %s", type(exc).__name__)
                self._fail_waiters(item, exc)
                self._lost.set()  # reconnect, and catch up once the database is back
            except Exception as exc:
                log.exception("event delivery failed")
                self._fail_waiters(item, exc)

    # internals

    def _on_notify(self, _conn, _pid: int, channel: str, payload: str) -> None:
        self._queue.put_nowait(("user", payload) if channel == USER_CHANGES_CHANNEL else ("event", payload))

    async def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "event":
            await self._on_event(item[1])
        elif kind == "serve":
            _, channel, future = item
            if channel not in self.last:
                self.last[channel] = (await self.store.last_offsets([channel]))[channel]
            if not future.done():
                future.set_result(None)
        elif kind == "release":
            self.last.pop(item[1], None)
        elif kind == "catch_up":
            if self.on_reconnect is not None:
                await self.on_reconnect()
            for channel in list(self.last):
                await self._fill(channel, None)
        elif kind == "user":
            await self.on_user_change(item[1])

    def _fail_waiters(self, item: tuple, exc: BaseException) -> None:
        if item[0] == "serve":
            self._ready.pop(item[1], None)
            if not item[2].done():
                item[2].set_exception(exc)

    async def _on_event(self, payload: str) -> None:
        channel, offset, large = notification_head(payload)
        last = self.last.get(channel)
        if last is None or offset <= last:
            return
        if offset > last + 1:
            await self._fill(channel, offset - 1)
        if large:
            event = await self.store.event(channel, offset)
            if event is None:  # pruned already; nothing to deliver
                self.last[channel] = offset
                return
        else:
            event = StoredEvent(channel, offset, payload)
        self._hand_over(event)

    async def _fill(self, channel: str, upto: int | None) -> None:
        """Deliver what the table holds after the last offset handed over (up to `upto`)."""
        while channel in self.last and (upto is None or self.last[channel] < upto):
            limit = GAP_PAGE if upto is None else min(GAP_PAGE, upto - self.last[channel])
            events = await self.store.history(channel, self.last[channel], limit)
            events = [e for e in events if upto is None or e.offset <= upto]
            if not events:
                return
            for event in events:
                self._hand_over(event)

    def _hand_over(self, event: StoredEvent) -> None:
        if event.channel in self.last and event.offset > self.last[event.channel]:
            self.last[event.channel] = event.offset
            self.deliver(event)


def side_listener(on_payload: Callable[[str], None]) -> Callable[..., None]:
    return lambda _conn, _pid, _channel, payload: on_payload(payload)
