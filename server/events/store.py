"""EventStore: durable events with gapless per-channel offsets, idempotency, history, retention."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from server.errors import Conflict, ValidationError
from server.events.committer import GroupCommitter, Item, channel_busy
from server.settings import EventsSettings

NOTIFY_LIMIT = 7900  # bytes; PostgreSQL refuses payloads of 8000 and more (store_event keeps to it)
EVENT_TYPE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
PRUNE_LOCK = 0x4845_5241_4C45  # one pruner at a time across processes


def events_channel(schema: str) -> str:
    """The NOTIFY channel store_event sends on and every process LISTENs on (herald_events).

    Named after the schema, so two deployments sharing a database do not hear each other.
    """
    return f"{schema}_events"


# The event's JSON text is built once, in SQL (event_json, migration 130), so the
# publisher's response, the NOTIFY payload and every subscriber's frame are the same bytes.
EVENT_JSON_SQL = 'event_json(e.channel, e."offset", e.type, e.data, e.time)'

CHANNEL_START = len('{"channel":"')
LARGE_END = ',"large":true}'


def notification_head(payload: str) -> tuple[str, int, bool]:
    """A NOTIFY payload's channel, offset and whether its body was left out (too large).

    Read from the fixed prefix both payload shapes above share, without parsing the data:
    every process receives every event of the deployment, most for channels it does not serve.
    """
    channel_end = payload.index('"', CHANNEL_START)
    offset_start = channel_end + len('","offset":')
    offset_end = payload.index(",", offset_start)
    return payload[CHANNEL_START:channel_end], int(payload[offset_start:offset_end]), payload.endswith(LARGE_END)


SELECT_EVENTS_SQL = f"""SELECT e."offset", {EVENT_JSON_SQL} AS json FROM events e"""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as every transport shows it: its coordinates and its JSON text."""

    channel: str
    offset: int
    json: str


@dataclass(frozen=True, slots=True)
class ChannelState:
    last_offset: int  # 0 for a channel that never had an event
    first_kept: int | None  # the oldest offset still in history, None if none is kept


def validate_event(body: dict[str, Any]) -> tuple[str, str]:
    """The type and the data as JSON text, from a publish body; 422 naming the field."""
    event_type = body.get("type", "message")
    if not isinstance(event_type, str) or not EVENT_TYPE.fullmatch(event_type):
        raise ValidationError.field("type", "must be 1 to 64 characters of A-Z a-z 0-9 _ . : -")
    unknown = set(body) - {"type", "data"}
    if unknown:
        raise ValidationError.field(sorted(unknown)[0], "is not a field of an event")
    try:
        data = json.dumps(body.get("data"), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        data.encode()
    except (ValueError, UnicodeEncodeError):
        raise ValidationError.field("data", "must be JSON with finite numbers and valid Unicode") from None
    return event_type, data


def validate_idempotency_key(key: str | None) -> str | None:
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise ValidationError.field("Idempotency-Key", "must be 1 to 255 visible ASCII characters")
    return key


def fingerprint(event_type: str, data: str) -> bytes:
    """What an idempotency key remembers of the body: the same key with another one is a conflict."""
    return hashlib.sha256(f"{event_type}\n{data}".encode()).digest()


class EventStore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: EventsSettings,
        on_published: Callable[[int], None] = lambda count: None,
        *,
        publish_wait: float = 5.0,
    ) -> None:
        self.pool = pool
        self.settings = settings
        # Every Herald publish is group-committed through publish_batch, which stores each
        # item with store_event: the one definition of storing an event (SQL publishers too).
        self.committer = GroupCommitter(pool, publish_wait, on_published)
        self.on_published = on_published

    async def publish(
        self, channel: str, event_type: str, data: str, idempotency_key: str | None = None
    ) -> tuple[StoredEvent, bool]:
        """Store an event; returns it and whether it is new (False: an idempotent replay).

        The channel row is locked by the offset increment until commit, so offsets are
        assigned in commit order and NOTIFY delivers them in that order. Behind an open
        SQL transaction on the channel it waits publish_wait at most, then 503.
        """
        key_print = fingerprint(event_type, data) if idempotency_key is not None else None
        (outcome,) = await self.committer.publish([Item(channel, event_type, data)], idempotency_key, key_print)
        if outcome.status == "conflict":
            raise Conflict("This Idempotency-Key was used with a different body")
        return StoredEvent(channel, outcome.offset, outcome.json), outcome.status == "new"

    async def publish_many(self, items: list[tuple[str, str, str]]) -> list[StoredEvent]:
        """Store (channel, type, data) items all or none, one request: offsets in request order."""
        outcomes = await self.committer.publish([Item(*item) for item in items])
        return [StoredEvent(item[0], o.offset, o.json) for item, o in zip(items, outcomes, strict=True)]

    async def publish_keyed(self, scope: str, key: str, items: list[tuple[str, str, str]]) -> tuple[bytes, bool]:
        """A batch request with an Idempotency-Key: its answer's body, and whether it is new.

        The key and the events commit together, outside the group commit (the key's row is
        the lock that makes a concurrent duplicate wait for the first one's answer).
        """
        key_print = hashlib.sha256(orjson.dumps(items)).digest()
        channels, types, datas = (list(column) for column in zip(*items, strict=True))
        try:
            row = await self.pool.fetchrow(
                "SELECT out_status, out_response FROM publish_request($1, $2, $3, $4, $5, $6, $7)",
                scope,
                key,
                key_print,
                channels,
                types,
                datas,
                self.committer.wait_ms,
            )
        except asyncpg.exceptions.LockNotAvailableError:
            raise channel_busy() from None
        if row["out_status"] == "conflict":
            raise Conflict("This Idempotency-Key was used with a different body")
        created = row["out_status"] == "new"
        if created:
            self.on_published(len(items))
        return row["out_response"].encode(), created

    async def _event(self, conn: asyncpg.Connection, channel: str, offset: int) -> StoredEvent | None:
        row = await conn.fetchrow(f'{SELECT_EVENTS_SQL} WHERE e.channel = $1 AND e."offset" = $2', channel, offset)
        return StoredEvent(channel, row["offset"], row["json"]) if row else None

    async def history(self, channel: str, after: int, limit: int) -> list[StoredEvent]:
        rows = await self.pool.fetch(
            f'{SELECT_EVENTS_SQL} WHERE e.channel = $1 AND e."offset" > $2 ORDER BY e."offset" LIMIT $3',
            channel,
            after,
            limit,
        )
        return [StoredEvent(channel, r["offset"], r["json"]) for r in rows]

    async def event(self, channel: str, offset: int) -> StoredEvent | None:
        async with self.pool.acquire() as conn:
            return await self._event(conn, channel, offset)

    async def state(self, channel: str) -> ChannelState:
        row = await self.pool.fetchrow(
            """SELECT (SELECT last_offset FROM channels WHERE name = $1) AS last_offset,
                      (SELECT min("offset") FROM events WHERE channel = $1) AS first_kept""",
            channel,
        )
        return ChannelState(row["last_offset"] or 0, row["first_kept"])

    async def last_offsets(self, channels: list[str]) -> dict[str, int]:
        rows = await self.pool.fetch("SELECT name, last_offset FROM channels WHERE name = any($1::text[])", channels)
        found = {r["name"]: r["last_offset"] for r in rows}
        return {c: found.get(c, 0) for c in channels}

    async def channels_after(self, after: str, limit: int) -> list[tuple[str, int]]:
        rows = await self.pool.fetch(
            "SELECT name, last_offset FROM channels WHERE name > $1 AND last_offset > 0 ORDER BY name LIMIT $2",
            after,
            limit,
        )
        return [(r["name"], r["last_offset"]) for r in rows]

    async def prune(self) -> int:
        """Drop events past the count and age limits, and expired idempotency keys."""
        async with self.pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", PRUNE_LOCK):
                return 0
            try:
                by_age = await conn.execute(
                    "DELETE FROM events WHERE time < now() - make_interval(secs => $1)",
                    float(self.settings.history_ttl),
                )
                by_count = await conn.execute(
                    """DELETE FROM events e USING channels c
                       WHERE e.channel = c.name AND e."offset" <= c.last_offset - $1""",
                    self.settings.history_size,
                )
                await conn.execute("DELETE FROM idempotency_keys WHERE created_at < now() - interval '24 hours'")
                await conn.execute("DELETE FROM request_keys WHERE created_at < now() - interval '24 hours'")
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", PRUNE_LOCK)
        return int(by_age.split()[-1]) + int(by_count.split()[-1])
