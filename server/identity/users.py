"""Users in PostgreSQL, and the short in-process cache that keeps token checks off the database."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from server.errors import Conflict, ValidationError
from server.identity.auth import check_password, hash_password, password_problem
from server.limits.hashing import HashingQueue
from server.storage.db import is_storable_text

if TYPE_CHECKING:
    from server.identity.revocations import Revocations

USERNAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
ROLE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
PSEUDO_ROLES = frozenset({"anonymous", "authenticated", "owner"})
USER_CHANGES_CHANNEL = "herald_users"  # NOTIFY channel: a user was deleted or changed
USER_COLUMNS = "id, username, roles, disabled, created_at"


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str
    roles: tuple[str, ...]
    disabled: bool
    created_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> User:
        return cls(row["id"], row["username"], tuple(row["roles"]), row["disabled"], row["created_at"])

    def public(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.username,
            "roles": list(self.roles),
            "disabled": self.disabled,
            "created_at": self.created_at.isoformat().replace("+00:00", "Z"),
        }


def validate_new_user(username: Any, password: Any, roles: Any) -> tuple[str, str, tuple[str, ...]]:
    problems = []
    if not isinstance(username, str) or not USERNAME.fullmatch(username):
        problems.append({"field": "username", "message": "must be 1 to 64 characters of A-Z a-z 0-9 _ . @ -"})
    if not isinstance(password, str):
        problems.append({"field": "password", "message": "must be a string"})
    elif not is_storable_text(password):  # bcrypt would take NUL; a lone surrogate has no bytes to hash
        problems.append({"field": "password", "message": "must be text without NUL characters or lone surrogates"})
    elif problem := password_problem(password):
        problems.append({"field": "password", "message": problem})
    if roles is None:
        roles = []
    if (
        not isinstance(roles, list)
        or not all(isinstance(r, str) and ROLE.fullmatch(r) for r in roles)
        or PSEUDO_ROLES.intersection(roles)
    ):
        problems.append(
            {"field": "roles", "message": "must be a list of role names (not anonymous/authenticated/owner)"}
        )
    if problems:
        raise ValidationError("; ".join(f"{p['field']}: {p['message']}" for p in problems), errors=problems)
    return username, password, tuple(dict.fromkeys(roles))


class UserStore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        bcrypt_rounds: int,
        cache_ttl: float = 5.0,
        revocations: Revocations | None = None,
        bcrypt_queue: int = 64,
    ) -> None:
        self.pool = pool
        self.revocations = revocations  # a disable revokes the user's tokens, so re-enabling revives none
        self.bcrypt_rounds = bcrypt_rounds
        self.hashing = HashingQueue(bcrypt_queue)  # 503 at once past this many hashes in flight
        self.cache_ttl = cache_ttl
        self._cache: dict[str, tuple[User | None, float]] = {}
        self._dummy_hash: str | None = None

    async def create(self, username: str, password: str, roles: tuple[str, ...]) -> User:
        async with self.hashing.slot():
            password_hash = await hash_password(password, self.bcrypt_rounds)
        try:
            row = await self.pool.fetchrow(
                f"INSERT INTO users (username, password_hash, roles) VALUES ($1, $2, $3) RETURNING {USER_COLUMNS}",
                username,
                password_hash,
                list(roles),
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"The username {username!r} is taken") from None
        return User.from_row(row)

    async def count(self) -> int:
        return await self.pool.fetchval("SELECT count(*) FROM users")

    async def page(self, after: int | None, limit: int) -> list[User]:
        rows = await self.pool.fetch(
            f"SELECT {USER_COLUMNS} FROM users WHERE id > $1 ORDER BY id LIMIT $2", after or 0, limit
        )
        return [User.from_row(r) for r in rows]

    async def delete(self, user_id: int) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            deleted = await conn.fetchval("DELETE FROM users WHERE id = $1 RETURNING id", user_id)
            if deleted is not None:
                await conn.execute("SELECT pg_notify($1, $2)", USER_CHANGES_CHANNEL, str(user_id))
        self.forget(str(user_id))
        return deleted is not None

    async def update(self, user_id: int, *, disabled: bool | None = None, roles: tuple[str, ...] | None = None):
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""UPDATE users SET disabled = coalesce($2, disabled), roles = coalesce($3, roles)
                    WHERE id = $1 RETURNING {USER_COLUMNS}""",
                user_id,
                disabled,
                list(roles) if roles is not None else None,
            )
            if row is not None and disabled:
                # A disable ends the user's browser sessions for good: re-enabling revives none.
                await conn.execute("DELETE FROM sessions WHERE user_id = $1", user_id)
            if row is not None:
                await conn.execute("SELECT pg_notify($1, $2)", USER_CHANGES_CHANNEL, str(user_id))
                if disabled and self.revocations is not None:
                    await self.revocations.record(conn, str(user_id))
        self.forget(str(user_id))
        return User.from_row(row) if row else None

    async def authenticate(self, username: str, password: str) -> User | None:
        """The active user with these credentials, or None, at the same cost either way."""
        if not (is_storable_text(username) and is_storable_text(password)):
            # No user can have such a name or password (PostgreSQL refuses NUL in text), so
            # these are wrong credentials: a 401 at the usual cost, not an error from asyncpg.
            async with self.hashing.slot():  # the same bound on bcrypt work as every other login
                await check_password("not-a-real-password", await self._hash_for_unknown_users())
            return None
        row = await self.pool.fetchrow(
            f"SELECT {USER_COLUMNS}, password_hash FROM users WHERE lower(username) = lower($1)", username
        )
        async with self.hashing.slot():
            stored = row["password_hash"] if row else await self._hash_for_unknown_users()
            matches = await check_password(password, stored)
        if row is None or not matches or row["disabled"]:
            return None
        return User.from_row(row)

    async def active_user(self, user_id: str) -> User | None:
        """The user behind a token's sub, if it exists and is not disabled (cached briefly)."""
        now = time.monotonic()
        cached = self._cache.get(user_id)
        if cached is not None and cached[1] > now:
            return cached[0]
        user = None
        if user_id.isascii() and user_id.isdigit() and len(user_id) < 19:  # not "²" (int() fails) nor "٤٢"
            row = await self.pool.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1", int(user_id))
            if row is not None and not row["disabled"]:
                user = User.from_row(row)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[user_id] = (user, now + self.cache_ttl)
        return user

    def forget(self, user_id: str) -> None:
        self._cache.pop(user_id, None)

    async def _hash_for_unknown_users(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = await hash_password("not-a-real-password", self.bcrypt_rounds)
        return self._dummy_hash
