"""Browser sessions: the encrypted cookie holds only an id; the row makes logout final."""

from __future__ import annotations

import secrets

import asyncpg


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

    async def end(self, session_id: str) -> None:
        await self.pool.execute("DELETE FROM sessions WHERE id = $1 OR expires_at < now()", session_id)
