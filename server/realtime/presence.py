"""Live subscriptions across every process of the deployment: subscriber counts and presence.

One mechanism for both (ARCHITECTURE.md, "Presence lives with the subscriber counts").
Each process keeps, in memory, how many of its subscriptions each (channel, member)
has; member is the identity's id on a presence channel, '' for anonymous subscribers
and for every subscriber of a channel without presence (those are only counted, so no
identities are stored for them). Only the (channel, member) counts that changed are
written, in one transaction per burst (debounced), with a NOTIFY carrying the new counts
of presence members so every process's Roster can send join and leave.

A process beats every HEARTBEAT seconds; readers ignore a process silent for STALE_AFTER
seconds, and any live process deletes it (its entries cascade) and announces it gone.
When the database comes back after an outage, a process whose row was swept meanwhile
registers again and rewrites every count it holds: presence is rebuilt from the live
connections, never lost for good.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from functools import partial
from typing import TYPE_CHECKING

import asyncpg
import orjson

from server.identity.auth import Identity
from server.identity.permissions import CompiledRule, has_presence
from server.storage.db import DATABASE_DOWN_ERRORS, DEFAULT_SCHEMA

if TYPE_CHECKING:
    from server.realtime.roster import Roster

log = logging.getLogger("herald.presence")

NOTICE_BYTES = 7000  # below PostgreSQL's 8000-byte NOTIFY limit, with room for one more entry
DEBOUNCE = 0.1  # seconds a burst of (un)subscribes gathers before one write
HEARTBEAT = 5.0
STALE_AFTER = 15.0  # seconds without a beat before a process's entries are ignored and removed
RETRY = 1.0

Key = tuple[str, str]  # (channel, member)

UPSERT_SQL = """
INSERT INTO presence_entries (process, channel, member, username, connections)
SELECT $1, c, m, u, n FROM unnest($2::text[], $3::text[], $4::text[], $5::int[]) AS t(c, m, u, n)
ON CONFLICT (process, channel, member)
DO UPDATE SET connections = excluded.connections, username = excluded.username
"""
DELETE_SQL = """
DELETE FROM presence_entries e USING unnest($2::text[], $3::text[]) AS t(c, m)
WHERE e.process = $1 AND e.channel = t.c AND e.member = t.m
"""
NOTIFY_SQL = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p"
REGISTER_SQL = """
INSERT INTO presence_processes (process) VALUES ($1)
ON CONFLICT (process) DO UPDATE SET beat_at = now()
"""
SWEEP_SQL = """
WITH gone AS (
    DELETE FROM presence_processes WHERE beat_at < now() - make_interval(secs => $1) RETURNING process
)
SELECT array_agg(process) FROM gone
"""
LIVE = "p.beat_at > now() - make_interval(secs => $2)"
TOTALS_SQL = f"""
SELECT e.channel, sum(e.connections)::int AS n
FROM presence_entries e JOIN presence_processes p USING (process)
WHERE e.channel = any($1::text[]) AND {LIVE}
GROUP BY e.channel
"""
# The answer is built as JSON text in SQL (usernames escaped by to_json): 5000 users are one
# string to pass on, not 5000 records and dicts on the event loop.
MEMBERS_SQL = f"""
WITH m AS (
    SELECT e.member, max(e.username) AS username, sum(e.connections)::int AS n
    FROM presence_entries e JOIN presence_processes p USING (process)
    WHERE e.channel = $1 AND {LIVE}
    GROUP BY e.member
)
SELECT coalesce(sum(n), 0)::int AS clients,
       '[' || coalesce(string_agg(
           '{{"id":' || to_json(member)::text || ',"username":' || to_json(username)::text
           || ',"connections":' || n || '}}', ',' ORDER BY member COLLATE "C"
       ) FILTER (WHERE member <> ''), '') || ']' AS users
FROM m
"""
# The roster's view trusts the table, not the beats: a process that merely has not beaten
# since an outage must not look gone; dead ones are deleted by the sweep, which says so.
ENTRIES_SQL = "SELECT process, member, username, connections FROM presence_entries WHERE channel = $1 AND member <> ''"


def presence_channel(schema: str) -> str:
    """The NOTIFY channel of presence changes (new counts, processes gone), named after the schema
    like the events channel, so two deployments sharing a database do not hear each other."""
    return f"{schema}_presence"


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def notices(process: str, entries: list[tuple[str, str, str, int]]) -> list[str]:
    """NOTIFY payloads, each under the limit: {"p": process, "e": [[channel, member, username, count]]}."""
    payloads, batch, size = [], [], 0
    head = len(orjson.dumps({"p": process, "e": []}))
    for entry in entries:
        encoded = len(orjson.dumps(entry)) + 1
        if batch and head + size + encoded > NOTICE_BYTES:
            payloads.append(orjson.dumps({"p": process, "e": batch}).decode())
            batch, size = [], 0
        batch.append(entry)
        size += encoded
    if batch:
        payloads.append(orjson.dumps({"p": process, "e": batch}).decode())
    return payloads


class Presence:
    """This process's share of the presence tables (written) and everyone's (read)."""

    def __init__(self, pool: asyncpg.Pool, rules: tuple[CompiledRule, ...], schema: str = DEFAULT_SCHEMA) -> None:
        self.pool = pool
        self.rules = rules
        self.notify_channel = presence_channel(schema)
        self.process = process_name()
        self.roster: Roster | None = None
        self.local: dict[Key, int] = {}
        self.usernames: dict[Key, str] = {}
        self.dirty: dict[Key, None] = {}  # changed since the last write, in order
        self.changed = asyncio.Event()
        self.registered = False
        self._asked: dict[str, asyncio.Future[bytes]] = {}  # channel -> the presence query in flight

    # what the hub tells: one subscription opened or closed

    def added(self, channel: str, identity: Identity | None) -> str:
        """Count a new subscription; returns its member key, which the hub keeps for removed()."""
        member = identity.id if identity is not None and has_presence(channel, self.rules) else ""
        key = (channel, member)
        count = self.local.get(key, 0)
        self.local[key] = count + 1
        if member:
            self.usernames[key] = identity.username  # type: ignore[union-attr]
        self._touch(key)
        return member

    def removed(self, channel: str, member: str) -> None:
        key = (channel, member)
        count = self.local.get(key, 0) - 1
        if count > 0:
            self.local[key] = count
        else:
            self.local.pop(key, None)
            self.usernames.pop(key, None)
        self._touch(key)

    def served(self, channel: str) -> None:
        """The hub's first subscription of a channel: the roster follows it if it has presence."""
        if self.roster is not None and has_presence(channel, self.rules):
            self.roster.watch(channel)

    def released(self, channel: str) -> None:
        if self.roster is not None:
            self.roster.unwatch(channel)

    def lost(self) -> None:
        """Another process swept this one (it could not beat for a while): register and rewrite."""
        self.registered = False
        self.changed.set()

    def _touch(self, key: Key) -> None:
        self.dirty[key] = None
        self.changed.set()

    # the writer

    async def report_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = 0.0
        while True:
            try:
                if not self.registered:
                    await self.register()
                if self.dirty:
                    await self.flush()
                if loop.time() >= next_beat:
                    await self.beat()
                    next_beat = loop.time() + HEARTBEAT
            except (*DATABASE_DOWN_ERRORS, asyncpg.PostgresError) as exc:
                if isinstance(exc, asyncpg.ForeignKeyViolationError):
                    self.registered = False  # swept while we could not beat: register, rewrite all
                log.warning("presence not written: %s; retrying", type(exc).__name__)
                next_beat = 0.0
                await asyncio.sleep(RETRY)
                continue
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=max(0.0, next_beat - loop.time()))
                await asyncio.sleep(DEBOUNCE)  # let a burst of (un)subscribes settle into one write
            except TimeoutError:
                pass
            self.changed.clear()

    async def register(self) -> None:
        """(Re)join the table: every count this process holds is written again."""
        await self.pool.execute(REGISTER_SQL, self.process)
        self.registered = True
        for key in self.local:
            self.dirty[key] = None

    async def flush(self) -> None:
        keys = list(self.dirty)
        self.dirty.clear()
        upserts = [(c, m, self.usernames.get((c, m), ""), self.local[(c, m)]) for c, m in keys if (c, m) in self.local]
        deletes = [(c, m) for c, m in keys if (c, m) not in self.local]
        announced = [[c, m, u, n] for c, m, u, n in upserts if m] + [[c, m, "", 0] for c, m in deletes if m]
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if upserts:
                    await conn.execute(UPSERT_SQL, self.process, *map(list, zip(*upserts, strict=True)))
                if deletes:
                    await conn.execute(DELETE_SQL, self.process, *map(list, zip(*deletes, strict=True)))
                if announced:
                    await conn.execute(NOTIFY_SQL, self.notify_channel, notices(self.process, announced))
        except BaseException:
            for key in keys:  # counts are absolute: writing them again later is always right
                self.dirty.setdefault(key, None)
            raise

    async def beat(self) -> None:
        """Say this process lives; remove (and announce) processes that stopped saying so."""
        status = await self.pool.execute(
            "UPDATE presence_processes SET beat_at = now() WHERE process = $1", self.process
        )
        if status == "UPDATE 0":
            self.registered = False
            await self.register()
        async with self.pool.acquire() as conn, conn.transaction():
            gone = await conn.fetchval(SWEEP_SQL, STALE_AFTER)
            if gone:
                log.info("presence of %d silent processes removed", len(gone))
                payload = orjson.dumps({"gone": gone}).decode()
                await conn.execute("SELECT pg_notify($1, $2)", self.notify_channel, payload)

    async def withdraw(self) -> None:
        """A clean stop: this process's entries go at once (the others' rosters are told)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM presence_processes WHERE process = $1", self.process)
            payload = orjson.dumps({"gone": [self.process]}).decode()
            await conn.execute("SELECT pg_notify($1, $2)", self.notify_channel, payload)

    # the readers

    async def totals(self, channels: list[str]) -> dict[str, int]:
        rows = await self.pool.fetch(TOTALS_SQL, channels, STALE_AFTER)
        found = {r["channel"]: r["n"] for r in rows}
        return {c: found.get(c, 0) for c in channels}

    async def members(self, channel: str) -> bytes:
        """PROTOCOL §14 as JSON: every live subscription in `clients`, identified users once each,
        by id. Concurrent askers of one channel share one query (a dashboard's worth of polls)."""
        pending = self._asked.get(channel)
        if pending is None:
            pending = self._asked[channel] = asyncio.ensure_future(self._members(channel))
            pending.add_done_callback(partial(self._answered, channel))
        return await asyncio.shield(pending)

    async def _members(self, channel: str) -> bytes:
        row = await self.pool.fetchrow(MEMBERS_SQL, channel, STALE_AFTER)
        return b'{"channel":"%s","clients":%d,"users":%s}' % (channel.encode(), row["clients"], row["users"].encode())

    def _answered(self, channel: str, task: asyncio.Future[bytes]) -> None:
        self._asked.pop(channel, None)
        if not task.cancelled():
            task.exception()  # retrieved here too: every asker may have left meanwhile

    async def entries(self, channel: str) -> list[asyncpg.Record]:
        return await self.pool.fetch(ENTRIES_SQL, channel)
