"""This process's subscriptions, and the fan-out of each event to them.

Every event is encoded once (EncodedEvent) and the same bytes are written to each
subscriber's transport, synchronously, in one loop: no per-subscriber encoding, task
or queue while a socket keeps up. A socket whose unsent bytes pass the configured
limit is closed as a slow consumer, so it never delays the others.

Resuming without gaps or duplicates (ARCHITECTURE.md, "Life of an event"): a new
subscription buffers live events from the moment it is registered; once the broker
serves the channel, history is read from the table and sent; then the buffer is
flushed, skipping what history already covered, and the subscription goes live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.events.store import EventStore, StoredEvent
from server.realtime.wire import EncodedEvent, EncodedNotice

if TYPE_CHECKING:
    from server.events.broker import Broker
    from server.identity.auth import Identity
    from server.realtime.connections import Connection
    from server.realtime.presence import Presence

log = logging.getLogger("herald.hub")

REPLAY_CHUNK_EVENTS = 100  # history read per query during a replay: count and bytes, whichever comes first
REPLAY_CHUNK_BYTES = 262144


class Subscription:
    """One connection following one channel; `pending` buffers live events until replay ends."""

    __slots__ = ("channel", "conn", "last_sent", "member", "pending", "pending_bytes")

    def __init__(self, conn: Connection, channel: str) -> None:
        self.conn = conn
        self.channel = channel
        self.last_sent = 0
        self.pending: list[EncodedEvent] | None = []
        self.pending_bytes = 0
        self.member = ""  # its key in the presence counts, fixed at subscribe (server/realtime/presence.py)


@dataclass(frozen=True, slots=True)
class Resume:
    """What a subscribe answers: the channel's last offset, and whether history reached back."""

    offset: int
    recovered: bool


class Hub:
    def __init__(
        self, store: EventStore, outbound_limit: int, max_replays: int = 16, replay_stall: float = 25.0
    ) -> None:
        self.store = store
        self.outbound_limit = outbound_limit
        # Unsent bytes a transport may hold before events wait in the connection's own backlog
        # (server/realtime/connections.py), which a slow close can still drop.
        self.soft_limit = max(16384, outbound_limit // 8)
        self.replays = asyncio.Semaphore(max_replays)  # this process's replay budget
        self.replay_stall = replay_stall
        self.broker: Broker | None = None
        self.presence: Presence | None = None
        self.channels: dict[str, dict[Connection, Subscription]] = {}
        self.connections: dict[Connection, None] = {}
        self.counts_changed = asyncio.Event()
        self.delivered: Counter[str] = Counter()  # per transport kind
        self.slow_closes = 0
        # Tests only: awaited inside subscribe(), after registering and before reading where the
        # channel stands, so a test can hold a subscription there and make the start race happen.
        self.subscribe_hook: Callable[[Connection, str], Awaitable[None]] | None = None
        # Set by the engine: is this identity revoked? A connection verified just before a
        # revocation, and attached just after it was announced, is closed here instead.
        self.revoked: Callable[[Identity], bool] | None = None

    # connections

    @contextlib.contextmanager
    def attached(self, conn: Connection) -> Iterator[Connection]:
        """A connection's lifetime in the hub: whatever ends it, its subscriptions, timers
        and tasks go with it (and shutdown can find it meanwhile)."""
        self.connections[conn] = None
        if conn.identity is not None and self.revoked is not None and self.revoked(conn.identity):
            conn.close(4403, "revoked")
        try:
            yield conn
        finally:
            self.detach(conn)
            conn.ended()

    def detach(self, conn: Connection) -> None:
        self.connections.pop(conn, None)
        for channel in list(conn.subscriptions):
            self.unsubscribe(conn, channel)

    def connections_of(self, user_id: str) -> list[Connection]:
        return [c for c in self.connections if c.identity is not None and c.identity.id == user_id]

    def close_all(self, code: int, reason: str) -> None:
        for conn in list(self.connections):
            conn.close(code, reason)

    # subscriptions

    async def subscribe(self, conn: Connection, channel: str, after: int | None) -> tuple[Subscription, Resume]:
        """Register first (live events buffer), then read where the channel stands.

        after=None: start at the channel's current end. Otherwise resume after that
        offset if history still reaches back, else start at the end, not recovered.
        """
        sub = Subscription(conn, channel)
        first = channel not in self.channels
        self.channels.setdefault(channel, {})[conn] = sub
        conn.subscriptions[channel] = sub
        self.counts_changed.set()
        if self.presence is not None:
            if first:
                self.presence.served(channel)
            sub.member = self.presence.added(channel, conn.identity)
        try:
            if self.subscribe_hook is not None:
                await self.subscribe_hook(conn, channel)
            if self.broker is not None:
                await self.broker.serve(channel)
            state = await self.store.state(channel)
        except BaseException:
            self.unsubscribe(conn, channel)
            raise
        last = state.last_offset
        if after is None or after == last:
            sub.last_sent = last
            return sub, Resume(last, True)
        reaches_back = after < last and state.first_kept is not None and state.first_kept <= after + 1
        sub.last_sent = after if reaches_back else last
        return sub, Resume(last, reaches_back)

    async def replay(self, sub: Subscription) -> None:
        """Send history after sub.last_sent through the connection's paced path, then go live.

        History is read a bounded chunk at a time (count and bytes), the next only once the
        last was written, and at most `replays` run at once in this process: a client that
        resumes from far back and does not read costs one chunk, not its whole backlog. A
        write the client does not drain within `replay_stall` seconds closes it as a slow
        consumer, as a live backlog over the outbound limit does.
        """
        if sub.pending is None:
            return
        async with self.replays:
            while sub.pending is not None:
                events, ended = await self.store.history_chunk(
                    sub.channel, sub.last_sent, REPLAY_CHUNK_EVENTS, REPLAY_CHUNK_BYTES
                )
                for event in events:
                    if sub.conn.closed or sub.conn.subscriptions.get(sub.channel) is not sub:
                        return
                    try:
                        async with asyncio.timeout(self.replay_stall):
                            await sub.conn.send_replayed(sub, event)
                    except TimeoutError:
                        self.close_slow(sub.conn)
                        return
                    sub.last_sent = event.offset
                    self.delivered[sub.conn.kind] += 1
                if ended:
                    self.go_live(sub)
                    return

    def go_live(self, sub: Subscription) -> None:
        pending, sub.pending = sub.pending or [], None
        for event in pending:
            if event.offset > sub.last_sent and not sub.conn.closed:
                sub.conn.deliver(sub, event)
                self.delivered[sub.conn.kind] += 1

    def unsubscribe(self, conn: Connection, channel: str) -> None:
        sub = conn.subscriptions.pop(channel, None)
        subscribers = self.channels.get(channel)
        if sub is None or subscribers is None:
            return
        subscribers.pop(conn, None)
        if self.presence is not None:
            self.presence.removed(channel, sub.member)
        if not subscribers:
            del self.channels[channel]
            if self.broker is not None:
                self.broker.release(channel)
            if self.presence is not None:
                self.presence.released(channel)
        self.counts_changed.set()

    def counts(self) -> dict[str, int]:
        return {channel: len(subs) for channel, subs in self.channels.items()}

    # fan-out

    def dispatch(self, event: StoredEvent) -> None:
        """Called by the broker for each event, in offset order per channel, exactly once."""
        subscribers = self.channels.get(event.channel)
        if not subscribers:
            return
        encoded = EncodedEvent.of(event)
        delivered = self.delivered
        for sub in list(subscribers.values()):
            if sub.pending is not None:
                sub.pending.append(encoded)
                sub.pending_bytes += len(encoded.ws_frame)
                if sub.pending_bytes > self.outbound_limit:
                    self.close_slow(sub.conn)
            elif encoded.offset > sub.last_sent and not sub.conn.closed:
                sub.conn.deliver(sub, encoded)
                delivered[sub.conn.kind] += 1

    def announce(self, channel: str, notices: list[tuple[str, EncodedNotice]]) -> int:
        """Presence join/leave messages (member, notice) to this process's subscribers of the
        channel, as one write per subscriber; a member's own subscriptions skip its notices.
        Returns how many messages were written. Not events: nothing is buffered for replay and
        no position moves."""
        subscribers = self.channels.get(channel)
        if not subscribers or not notices:
            return 0
        whole = EncodedNotice.joined([notice for _, notice in notices])
        members = {member for member, _ in notices}
        sent = 0
        for sub in list(subscribers.values()):
            if sub.conn.closed:
                continue
            if sub.member in members:
                own = [notice for member, notice in notices if member != sub.member]
                if not own:
                    continue
                sub.conn.send_notice(EncodedNotice.joined(own))
                sent += len(own)
            else:
                sub.conn.send_notice(whole)
                sent += len(notices)
        return sent

    def close_slow(self, conn: Connection) -> None:
        if conn.closed:
            return
        self.slow_closes += 1
        log.warning("closing a slow consumer", extra={"connection": conn.id, "transport": conn.kind})
        self.detach(conn)
        conn.close_slow()
