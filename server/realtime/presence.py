"""Live subscriber counts across every process of the deployment.

Each process writes its own counts to a table when they change (debounced) and at
least every few seconds; readers sum the rows of processes heard from recently.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket

import asyncpg

from server.realtime.hub import Hub
from server.storage.db import DATABASE_DOWN_ERRORS

log = logging.getLogger("herald.presence")

DEBOUNCE = 0.1
HEARTBEAT = 5.0
STALE_AFTER = 15  # seconds without a report before a process's counts are ignored


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Presence:
    def __init__(self, pool: asyncpg.Pool, hub: Hub) -> None:
        self.pool = pool
        self.hub = hub
        self.process = process_name()

    async def report_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.hub.counts_changed.wait(), timeout=HEARTBEAT)
                await asyncio.sleep(DEBOUNCE)  # let a burst of (un)subscribes settle into one write
            except TimeoutError:
                pass
            self.hub.counts_changed.clear()
            try:
                await self.report()
            except DATABASE_DOWN_ERRORS:
                self.hub.counts_changed.set()  # try again on the next beat
                await asyncio.sleep(1)

    async def report(self) -> None:
        counts = self.hub.counts()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM subscriber_counts WHERE process = $1", self.process)
            await conn.execute(
                """INSERT INTO subscriber_counts (process, channel, count)
                   SELECT $1, c, n FROM unnest($2::text[], $3::int[]) AS t(c, n)""",
                self.process,
                list(counts),
                list(counts.values()),
            )

    async def withdraw(self) -> None:
        await self.pool.execute("DELETE FROM subscriber_counts WHERE process = $1", self.process)

    async def totals(self, channels: list[str]) -> dict[str, int]:
        rows = await self.pool.fetch(
            """SELECT channel, sum(count)::int AS n FROM subscriber_counts
               WHERE channel = any($1::text[]) AND updated_at > now() - make_interval(secs => $2)
               GROUP BY channel""",
            channels,
            float(STALE_AFTER),
        )
        found = {r["channel"]: r["n"] for r in rows}
        return {c: found.get(c, 0) for c in channels}
