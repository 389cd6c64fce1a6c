"""EventStore: durable events with gapless per-channel offsets, idempotency, history, retention."""

from __future__ import annotations

import contextlib
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
from server.storage.db import committed_connection

EVENT_TYPE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
PRUNE_LOCK = 0x4845_5241_4C45  # one pruner at a time across processes
SUBSCRIBERS_FRESH = 15  # seconds: a process's subscriber counts older than this are a dead process's


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

# A stretch of history bounded by count and by bytes: the window reads only the sizes of
# at most $3 rows; the bodies are read for the events that fit in $4 bytes (the first
# one always, so a page never comes back empty while events remain).
HISTORY_CHUNK_SQL = f"""
SELECT e."offset", {EVENT_JSON_SQL} AS json, w.n FROM (
    SELECT "offset", sum(size) OVER (ORDER BY "offset") - size AS before, count(*) OVER () AS n
    FROM (SELECT "offset", octet_length(data) AS size FROM events
          WHERE channel = $1 AND "offset" > $2 ORDER BY "offset" LIMIT $3) AS page
) AS w JOIN events e ON e.channel = $1 AND e."offset" = w."offset"
WHERE w.before < $4
ORDER BY e."offset"
"""


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
    return event_type, data_text(body.get("data"))


def data_text(data: Any) -> str:
    """An event's data as compact JSON text; 422 for what JSON cannot hold.

    orjson writes it in a fraction of the stdlib's time but writes an infinite float
    (which the stdlib decoder makes of 1e400) as null, so a text with a null in it is
    written again by the stdlib, which refuses infinities; orjson refuses integers past
    64 bits and lone surrogates, which go to the stdlib too.
    """
    with contextlib.suppress(orjson.JSONEncodeError):
        text = orjson.dumps(data)
        if b"null" not in text:
            return text.decode()
    try:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        text.encode()
    except (ValueError, UnicodeEncodeError):
        raise ValidationError.field("data", "must be JSON with finite numbers and valid Unicode") from None
    return text


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
        publish_flights: int = 2,
        synchronous_commit: bool = True,
    ) -> None:
        self.pool = pool
        self.settings = settings
        # Every Herald publish is group-committed through publish_batch, which stores each
        # item with store_event: the one definition of storing an event (SQL publishers too).
        self.committer = GroupCommitter(pool, publish_wait, on_published, publish_flights, synchronous_commit)
        self.on_published = on_published

    async def close(self) -> None:
        await self.committer.close()

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
            async with committed_connection(self.pool) as conn:  # committed: answered, whatever breaks after
                row = await conn.fetchrow(
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

    async def history_chunk(
        self, channel: str, after: int, limit: int, max_bytes: int
    ) -> tuple[list[StoredEvent], bool]:
        """At most `limit` events after `after` whose data fits in max_bytes (at least one),
        and whether the channel had nothing more at the time (no further chunk needed)."""
        rows = await self.pool.fetch(HISTORY_CHUNK_SQL, channel, after, limit, max_bytes)
        events = [StoredEvent(channel, r["offset"], r["json"]) for r in rows]
        ended = not rows or (rows[0]["n"] < limit and len(rows) == rows[0]["n"])
        return events, ended

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

    async def _prune_channels(self, conn: asyncpg.Connection, touched: list[str]) -> int:
        """Mark the channels that just lost their last event, unmark those that have events
        again, and drop those empty for a whole history TTL that nobody follows.

        Only the pruner writes emptied_at; a publish never needs to. The DELETE compares
        last_offset with what it read: a publish racing it bumps the offset under the row
        lock, the re-check fails, and the row (with its counter) stays.
        """
        await conn.execute(
            """UPDATE channels c SET emptied_at = now()
               WHERE c.name = any($1::text[]) AND c.emptied_at IS NULL
                 AND NOT EXISTS (SELECT 1 FROM events e WHERE e.channel = c.name)""",
            touched,
        )
        await conn.execute(
            """UPDATE channels c SET emptied_at = NULL
               WHERE c.emptied_at IS NOT NULL AND EXISTS (SELECT 1 FROM events e WHERE e.channel = c.name)"""
        )
        deleted = await conn.execute(
            """DELETE FROM channels c USING (
                   SELECT name, last_offset FROM channels d
                   WHERE d.emptied_at < now() - make_interval(secs => $1)
                     AND NOT EXISTS (SELECT 1 FROM events e WHERE e.channel = d.name)
                     AND NOT EXISTS (SELECT 1 FROM idempotency_keys k WHERE k.channel = d.name)
                     AND NOT EXISTS (SELECT 1 FROM presence_entries s JOIN presence_processes p USING (process)
                                     WHERE s.channel = d.name
                                       AND p.beat_at > now() - make_interval(secs => $2))
                   LIMIT 10000
               ) AS old
               WHERE c.name = old.name AND c.last_offset = old.last_offset""",
            float(self.settings.history_ttl),
            float(SUBSCRIBERS_FRESH),
        )
        return int(deleted.split()[-1])

    async def channels_page(
        self, after: str, limit: int, allowed_sql: str, params: list, scan: int
    ) -> tuple[list[tuple[str, int]], str | None]:
        """Channels after `after` with events that `allowed_sql` admits, at most `limit`,
        looking at no more than `scan` rows: the list costs the same however many channels
        exist. Returns them and where to go on (None when the scan reached the end)."""
        rows = await self.pool.fetch(
            f"""WITH scanned AS MATERIALIZED (
                    SELECT name, last_offset FROM channels WHERE name > $1 AND last_offset > 0 ORDER BY name LIMIT $2
                ), allowed AS (
                    SELECT name, last_offset FROM scanned WHERE {allowed_sql} ORDER BY name LIMIT $3
                )
                SELECT name, last_offset, false AS summary FROM allowed
                UNION ALL SELECT max(name), count(*), true FROM scanned
                ORDER BY summary, name""",
            after,
            scan,
            limit,
            *params,
        )
        *found, summary = rows
        items = [(r["name"], r["last_offset"]) for r in found]
        if len(items) == limit:
            return items, items[-1][0]
        return items, summary["name"] if summary["last_offset"] == scan else None

    async def prune(self) -> int:
        """Drop events past the count and age limits, and expired idempotency keys."""
        async with self.pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", PRUNE_LOCK):
                return 0
            try:
                emptied = await conn.fetch(
                    """WITH gone AS (
                           DELETE FROM events WHERE time < now() - make_interval(secs => $1) RETURNING channel
                       ) SELECT channel, count(*) AS n FROM gone GROUP BY channel""",
                    float(self.settings.history_ttl),
                )
                by_age = f"DELETE {sum(r['n'] for r in emptied)}"
                await self._prune_channels(conn, [r["channel"] for r in emptied])
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
