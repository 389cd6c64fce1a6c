"""Identity's one front door: which verifier a token goes to, and the checks every token passes.

A token is routed by its `iss` to exactly one verifier: Herald's own TokenService (and the
user it names, from the database's short cache) or one application issuer (§13, no database
at all). Whatever proved it, a revoked identity's older tokens are refused here, on every
use, cached or not. The auth middleware and the WebSocket `auth` op both come through here.
"""

from __future__ import annotations

import dataclasses
import time

import jwt

from server.errors import Unauthorized
from server.identity.auth import VERIFIED_CACHE_SIZE, Identity, InvalidToken, TokenService
from server.identity.issuers import Issuer, Issuers
from server.identity.revocations import Revocations
from server.identity.users import UserStore


class Authenticator:
    def __init__(self, tokens: TokenService, users: UserStore, issuers: Issuers, revocations: Revocations) -> None:
        self.tokens = tokens
        self.users = users
        self.issuers = issuers
        self.revocations = revocations
        # Application tokens seen before: token -> (identity, its issuer, the issuer's key generation).
        # The signature cannot change, the clock and the issuer's keys can: both are checked on each use.
        self._verified: dict[str, tuple[Identity, Issuer, int]] = {}

    async def identity_for(self, token: str, via: str) -> Identity:
        """The identity a bearer token proves, or Unauthorized (401)."""
        try:
            identity = await self._verify(token, via)
        except InvalidToken:
            raise Unauthorized("The token is invalid or expired") from None
        if self.revocations.refuses(identity):
            raise Unauthorized("The token has been revoked")
        return identity

    async def _verify(self, token: str, via: str) -> Identity:
        cached = self._verified.get(token)
        if cached is not None:
            identity, issuer, generation = cached
            if issuer.generation == generation and identity.expires is not None and identity.expires > time.time():
                return identity if identity.via == via else _with_via(identity, via)
            del self._verified[token]
        if not self.issuers.by_iss or self.tokens.seen(token):
            return await self._herald_identity(token, via)
        issuer = self.issuers.get(_unverified_issuer(token))
        if issuer is None:
            return await self._herald_identity(token, via)
        generation = issuer.generation
        identity = await issuer.identity_for(token, via)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = (identity, issuer, generation)
        return identity

    async def _herald_identity(self, token: str, via: str) -> Identity:
        """Herald's own token: valid claims and an existing, active user (whose roles count)."""
        claims = self.tokens.verify(token)
        user = await self.users.active_user(claims["sub"])
        if user is None:
            raise Unauthorized("The token's user no longer exists or is disabled")
        iat = claims.get("iat")
        return Identity(
            str(user.id),
            user.username,
            frozenset(user.roles),
            via=via,
            expires=float(claims["exp"]),
            issued_at=float(iat) if isinstance(iat, int | float) else None,
        )


def _unverified_issuer(token: str) -> object:
    """The `iss` a token claims, read only to pick its verifier (which then checks everything)."""
    try:
        return jwt.decode(token, options={"verify_signature": False}).get("iss")
    except jwt.PyJWTError as exc:
        raise InvalidToken(f"{type(exc).__name__}: {exc}") from None


def _with_via(identity: Identity, via: str) -> Identity:
    return dataclasses.replace(identity, via=via)
