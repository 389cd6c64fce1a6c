"""Revocations (PROTOCOL §13, §15): an identity's tokens issued up to a moment are refused.

The table is the truth, so a restarted worker or another instance refuses the same tokens;
each process keeps the live rows in memory (a dict lookup per request, no database round
trip) and hears of new ones over the user-changes NOTIFY channel, reloading the table
whenever its listener (re)connects. A row lives as long as a token issued before it could
(`lifetime`: the longest token lifetime any verifier accepts), then it is pruned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import asyncpg

from server.identity.auth import Identity
from server.identity.users import USER_CHANGES_CHANNEL
from server.settings import AuthSettings

log = logging.getLogger("herald.revocations")

NOTIFY_PREFIX = "revoked "  # "revoked <revoked_at> <identity id>"; user changes send a bare numeric id
MAX_IDENTITY_ID = 512

RECORD_SQL = """
INSERT INTO revocations (identity_id, revoked_at, expires_at)
VALUES ($1, floor(extract(epoch FROM now()))::bigint, floor(extract(epoch FROM now()))::bigint + $2)
ON CONFLICT (identity_id) DO UPDATE
    SET revoked_at = greatest(revocations.revoked_at, excluded.revoked_at),
        expires_at = greatest(revocations.expires_at, excluded.expires_at)
RETURNING revoked_at, expires_at
"""


def revocation_lifetime(auth: AuthSettings) -> int:
    """How long a revocation must last: no accepted token lives longer than this."""
    return max([auth.token_ttl, *(issuer.max_token_ttl for issuer in auth.issuers)])


def notification(identity_id: str, revoked_at: int, expires_at: int) -> str:
    return f"{NOTIFY_PREFIX}{revoked_at} {expires_at} {identity_id}"


def parse_notification(payload: str) -> tuple[str, int, int] | None:
    """(identity id, revoked_at, expires_at) of a revocation notice, None for anything else."""
    if not payload.startswith(NOTIFY_PREFIX):
        return None
    revoked_at, expires_at, identity_id = payload[len(NOTIFY_PREFIX) :].split(" ", 2)
    return identity_id, int(revoked_at), int(expires_at)


class Revocations:
    def __init__(self, pool: asyncpg.Pool, lifetime: int) -> None:
        self.pool = pool
        self.lifetime = lifetime
        self._revoked: dict[str, tuple[int, int]] = {}  # identity id -> (revoked_at, expires_at)

    def refuses(self, identity: Identity) -> bool:
        """Is this identity's credential one issued at or before its revocation?"""
        found = self._revoked.get(identity.id)
        if found is None:
            return False
        revoked_at, expires_at = found
        if expires_at < time.time():
            return False
        return identity.issued_at is None or identity.issued_at <= revoked_at

    async def revoke(self, identity_id: str) -> int:
        """Record (and announce) a revocation now; returns its moment (epoch seconds)."""
        async with self.pool.acquire() as conn, conn.transaction():
            return await self.record(conn, identity_id)

    async def record(self, conn: asyncpg.Connection, identity_id: str) -> int:
        """In the caller's transaction (a user's disable), so both commit or neither does."""
        row = await conn.fetchrow(RECORD_SQL, identity_id, self.lifetime)
        payload = notification(identity_id, row["revoked_at"], row["expires_at"])
        await conn.execute("SELECT pg_notify($1, $2)", USER_CHANGES_CHANNEL, payload)
        self.remember(identity_id, row["revoked_at"], row["expires_at"])
        return row["revoked_at"]

    def remember(self, identity_id: str, revoked_at: int, expires_at: int) -> None:
        known = self._revoked.get(identity_id, (revoked_at, expires_at))
        self._revoked[identity_id] = (max(known[0], revoked_at), max(known[1], expires_at))

    async def reload(self) -> None:
        """Every live row, read again: at start-up and after the listener missed notices."""
        rows = await self.pool.fetch(
            "SELECT identity_id, revoked_at, expires_at FROM revocations "
            "WHERE expires_at >= floor(extract(epoch FROM now()))::bigint"
        )
        self.replace((row["identity_id"], row["revoked_at"], row["expires_at"]) for row in rows)

    def replace(self, rows: Iterable[tuple[str, int, int]]) -> None:
        self._revoked = {identity_id: (revoked_at, expires_at) for identity_id, revoked_at, expires_at in rows}

    async def prune(self) -> int:
        """Drop revocations no token can outlive any more, here and in the table."""
        now = time.time()
        self._revoked = {k: v for k, v in self._revoked.items() if v[1] >= now}
        status = await self.pool.execute(
            "DELETE FROM revocations WHERE expires_at < floor(extract(epoch FROM now()))::bigint"
        )
        return int(status.split()[-1])
