"""Browser sessions: the encrypted cookie holds only an id; the row makes logout final."""

from __future__ import annotations

import secrets
from datetime import datetime

import asyncpg

from server.identity.users import USER_CHANGES_CHANNEL


class SessionStore:
    def __init__(self, pool: asyncpg.Pool, ttl: int) -> None:
        self.pool = pool
        self.ttl = ttl

    async def create(self, user_id: int) -> str:
        session_id = secrets.token_urlsafe(32)
        await self.pool.execute(
            "INSERT INTO sessions (id, user_id, expires_at) VALUES ($1, $2, now() + make_interval(secs => $3))",
            session_id,
            user_id,
            float(self.ttl),
        )
        return session_id

    async def user_id(self, session_id: str) -> int | None:
        """The user of a live session, or None if it ended, expired or never existed."""
        return await self.pool.fetchval("SELECT user_id FROM sessions WHERE id = $1 AND expires_at > now()", session_id)

    async def lookup(self, session_id: str) -> tuple[int, datetime] | None:
        """The user and the end of a live session, or None if it ended, expired or never existed."""
        row = await self.pool.fetchrow(
            "SELECT user_id, expires_at FROM sessions WHERE id = $1 AND expires_at > now()", session_id
        )
        return (row["user_id"], row["expires_at"]) if row is not None else None

    async def is_live(self, session_id: str) -> bool:
        return await self.user_id(session_id) is not None

    async def end(self, session_id: str) -> None:
        """Delete the session, and tell every process: its connections opened with it end too."""
        async with self.pool.acquire() as conn, conn.transaction():
            user_id = await conn.fetchval("DELETE FROM sessions WHERE id = $1 RETURNING user_id", session_id)
            await conn.execute("DELETE FROM sessions WHERE expires_at < now()")
            if user_id is not None:
                await conn.execute("SELECT pg_notify($1, $2)", USER_CHANGES_CHANNEL, str(user_id))
