"""Passwords (bcrypt, off the event loop), tokens (JWT, pinned algorithm) and Identity."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bcrypt
import jwt

from server.identity.secrets import load_or_create_secret
from server.settings import AuthSettings

if TYPE_CHECKING:
    from server.identity.permissions import Grants

BCRYPT_MAX_BYTES = 72
VERIFIED_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling. `via` says which credential proved it; `expires` is the token's exp
    (or the session's end), `issued_at` its iat (what a revocation compares), `grants` an
    application token's `channels` claim (PROTOCOL §13). `session` is the browser session
    behind a cookie identity: a connection opened with it ends when that session does."""

    id: str
    username: str
    roles: frozenset[str]
    via: str = "bearer"
    expires: float | None = None
    issued_at: float | None = None
    grants: Grants | None = None
    session: str | None = None

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "username": self.username, "roles": sorted(self.roles)}


class InvalidToken(Exception):
    """The token is not one Herald accepts; str() says why (for logs, not for clients)."""


def password_problem(password: str) -> str | None:
    """Why a new password is refused, or None. bcrypt only reads 72 bytes: longer is refused."""
    if len(password) < 8:
        return "must be at least 8 characters"
    if len(password.encode()) > BCRYPT_MAX_BYTES:
        return f"must be at most {BCRYPT_MAX_BYTES} bytes"
    return None


async def hash_password(password: str, rounds: int) -> str:
    salt = bcrypt.gensalt(rounds)
    hashed = await asyncio.to_thread(bcrypt.hashpw, password.encode(), salt)
    return hashed.decode()


async def check_password(password: str, password_hash: str) -> bool:
    """Constant-cost check; an over-long password is simply wrong (bcrypt 5 would raise)."""
    candidate = password.encode()
    too_long = len(candidate) > BCRYPT_MAX_BYTES
    matches = await asyncio.to_thread(bcrypt.checkpw, candidate[:BCRYPT_MAX_BYTES], password_hash.encode())
    return matches and not too_long


class TokenService:
    """Issues and verifies Herald's JWTs with exactly one configured algorithm."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self.algorithm = settings.jwt_algorithm
        self._verified: dict[str, dict[str, Any]] = {}
        if self.algorithm.startswith("HS"):
            secret = settings.jwt_secret or load_or_create_secret(settings.secrets_dir, "jwt_secret")
            self._signing_key: Any = secret
            self._verify_key: Any = secret
        else:
            self._signing_key = _read(settings.jwt_private_key_file)
            self._verify_key = _read(settings.jwt_public_key_file)

    def issue(self, user_id: str, username: str, roles: list[str] | tuple[str, ...]) -> str:
        if self._signing_key is None:
            raise RuntimeError("auth.jwt_private_key_file is needed to issue tokens")
        now = int(time.time())
        claims = {
            "sub": user_id,
            "name": username,
            "roles": list(roles),
            "iat": now,
            "exp": now + self.settings.token_ttl,
            "iss": self.settings.jwt_issuer,
            "aud": self.settings.jwt_audience,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._signing_key, algorithm=self.algorithm)

    def seen(self, token: str) -> bool:
        """Verified before (and cached): the front door need not read its iss to route it."""
        return token in self._verified

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims. A token seen before skips the signature check (it cannot
        change) but not the clock: exp and nbf are checked again on every use."""
        now = time.time()
        claims = self._verified.get(token)
        if claims is not None and claims["exp"] > now and claims.get("nbf", 0) <= now:
            return claims
        claims = self._decode(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = claims
        return claims

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            claims = jwt.decode(
                token,
                self._verify_key,
                algorithms=[self.algorithm],
                audience=self.settings.jwt_audience,
                issuer=self.settings.jwt_issuer,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"{type(exc).__name__}: {exc}") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise InvalidToken("sub must be a non-empty string")
        return claims


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None
