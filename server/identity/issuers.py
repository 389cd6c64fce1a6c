"""Application issuers (PROTOCOL §13): tokens an application signs for users Herald does not store.

Each `[[auth.issuers]]` entry is one Issuer holding its own keys (an HMAC secret, a PEM
public key, or a JWKS from a file or URL) and its own pinned algorithms. A token reaches an
issuer only through its `iss`, so one issuer's key can never verify another issuer's token.
A JWKS is cached; an unknown `kid` re-reads it at most once per REFETCH_INTERVAL, and a read
that fails (down, garbage, no usable key) keeps the last good keys and is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from server.identity.auth import Identity, InvalidToken
from server.identity.permissions import compile_grants
from server.settings import IssuerSettings, SettingsError

log = logging.getLogger("herald.issuers")

REFETCH_INTERVAL = 60.0  # seconds: at most one unknown-kid re-read of a JWKS per issuer
REFRESH_INTERVAL = 300.0  # seconds: a JWKS is also re-read this often, so removed keys go away
JWKS_TIMEOUT = 5.0
JWKS_MAX_BYTES = 1 << 20
MAX_SUB_LENGTH = 256
MIN_RSA_BITS = 2048  # NIST SP 800-131A; a shorter key in a JWKS is skipped, in a PEM file refused
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub"]

# Which kind of key each algorithm verifies with (JWK `kty`).
KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP", "HS": "oct"}


def key_type_of(algorithm: str) -> str:
    return KEY_TYPES[algorithm[:2]]


@dataclass(frozen=True, slots=True)
class IssuerKey:
    kid: str | None
    kty: str
    key: Any  # a cryptography public key, or the HMAC secret's bytes
    alg: str | None = None  # the JWK's own `alg`, when it names one

    def fits(self, algorithm: str) -> bool:
        return self.kty == key_type_of(algorithm) and self.alg in (None, algorithm)


def kty_of_public_key(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"an RSA key of {key.key_size} bits is too short (at least {MIN_RSA_BITS})")
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "OKP"
    raise ValueError(f"unsupported key type {type(key).__name__}")


def keys_from_pem(data: bytes) -> list[IssuerKey]:
    key = load_pem_public_key(data)
    return [IssuerKey(None, kty_of_public_key(key), key)]


def keys_from_jwks(data: bytes | str) -> list[IssuerKey]:
    """The usable signature keys of a JWKS document; ValueError if there are none."""
    document = json.loads(data)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("a JWKS is a JSON object with a 'keys' list")
    keys = []
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or jwk.get("kty") == "oct":
            continue  # encryption keys and shared secrets have no place in a public key set
        try:
            parsed = jwt.PyJWK(jwk)
            kty = kty_of_public_key(parsed.key)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            log.warning("skipping a JWK that cannot be used (kid %r): %s", jwk.get("kid"), exc)
            continue
        kid = jwk.get("kid") if isinstance(jwk.get("kid"), str) else None
        alg = jwk.get("alg") if isinstance(jwk.get("alg"), str) else None
        keys.append(IssuerKey(kid, kty, parsed.key, alg))
    if not keys:
        raise ValueError("the JWKS holds no usable signature key")
    return keys


def check_issuer_keys(index: int, settings: IssuerSettings) -> None:
    """Start-up check (settings validation): a key file that cannot be used stops Herald (exit 2)."""
    issuer = Issuer(settings)
    source = settings.key_source
    if source in ("public_key_file", "jwks_file"):
        try:
            issuer.keys = issuer.read_key_file()
        except (OSError, ValueError) as exc:
            raise SettingsError(f"auth.issuers[{index}].{source}", f"cannot be used: {exc}") from None
        if not any(key.fits(algorithm) for key in issuer.keys for algorithm in settings.algorithms):
            raise SettingsError(f"auth.issuers[{index}].{source}", f"holds no key for {', '.join(settings.algorithms)}")


class Issuer:
    """One application issuer: its keys, and the one way its tokens become identities."""

    def __init__(self, settings: IssuerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.keys: list[IssuerKey] = []
        self.generation = 0  # bumped when the keys change: cached identities of older keys are re-checked
        self.http: aiohttp.ClientSession | None = None
        self._last_refetch: float | None = None
        self._reading = asyncio.Lock()
        if settings.secret:
            self.keys = [IssuerKey(None, "oct", settings.secret.encode())]

    @property
    def rereadable(self) -> bool:
        return bool(self.settings.jwks_file or self.settings.jwks_url)

    def read_key_file(self) -> list[IssuerKey]:
        if self.settings.public_key_file:
            return keys_from_pem(Path(self.settings.public_key_file).read_bytes())
        return keys_from_jwks(Path(self.settings.jwks_file).read_bytes())

    async def load(self) -> bool:
        """(Re)read the keys; on failure keep the last good ones and log why. True if they changed."""
        source = self.settings.key_source
        if source == "secret":
            return False
        try:
            if source == "jwks_url":
                keys = keys_from_jwks(await self._fetch())
            else:
                keys = await asyncio.to_thread(self.read_key_file)
        except (OSError, ValueError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning(
                "keys of issuer %r not updated from %s (keeping %d last good keys): %s",
                self.settings.issuer,
                source,
                len(self.keys),
                exc,
            )
            return False
        if keys == self.keys:
            return False
        self.keys = keys
        self.generation += 1
        log.info("issuer %r: %d keys loaded from %s", self.settings.issuer, len(keys), source)
        return True

    async def _fetch(self) -> bytes:
        if self.http is None:
            raise aiohttp.ClientError("no HTTP client (the app is not running)")
        timeout = aiohttp.ClientTimeout(total=JWKS_TIMEOUT)
        async with self.http.get(self.settings.jwks_url, timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise aiohttp.ClientError(f"HTTP {resp.status}")
            body = await resp.content.read(JWKS_MAX_BYTES + 1)
            if len(body) > JWKS_MAX_BYTES:
                raise ValueError(f"the JWKS is over {JWKS_MAX_BYTES} bytes")
            return body

    async def refetch_for(self, kid: str) -> None:
        """An unknown kid: re-read the key set, unless that was done less than REFETCH_INTERVAL ago."""
        async with self._reading:
            if any(key.kid == kid for key in self.keys):
                return  # someone else's re-read found it meanwhile
            now = self.clock()
            if self._last_refetch is not None and now - self._last_refetch < REFETCH_INTERVAL:
                return
            self._last_refetch = now
            await self.load()

    def candidates(self, algorithm: str, kid: str | None) -> list[IssuerKey]:
        usable = [key for key in self.keys if any(key.fits(a) for a in self.settings.algorithms)]
        if kid is None:
            # Without a kid the key is only unambiguous if the issuer has exactly one.
            return usable if len(usable) == 1 and usable[0].fits(algorithm) else []
        return [key for key in usable if key.kid == kid and key.fits(algorithm)]

    async def identity_for(self, token: str, via: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"{type(exc).__name__}: {exc}") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in self.settings.algorithms:
            raise InvalidToken(f"algorithm {algorithm!r} is not pinned for issuer {self.settings.issuer!r}")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("kid must be a string")
        keys = self.candidates(algorithm, kid)
        if not keys and kid is not None and self.rereadable:
            await self.refetch_for(kid)
            keys = self.candidates(algorithm, kid)
        if not keys:
            raise InvalidToken(f"no key of issuer {self.settings.issuer!r} for kid {kid!r} and {algorithm}")
        claims = self.decode(token, algorithm, keys)
        return self.identity_from(claims, via)

    def decode(self, token: str, algorithm: str, keys: Iterable[IssuerKey]) -> dict[str, Any]:
        problem = "no key"
        for key in keys:
            try:
                return jwt.decode(
                    token,
                    key.key,
                    algorithms=[algorithm],
                    audience=self.settings.audience,
                    issuer=self.settings.issuer,
                    options={"require": REQUIRED_CLAIMS, "verify_iat": True},
                )
            except jwt.InvalidSignatureError as exc:
                problem = str(exc)  # a JWKS may hold several keys under one kid: try the next
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                raise InvalidToken(f"{type(exc).__name__}: {exc}") from None
        raise InvalidToken(f"InvalidSignatureError: {problem}")

    def identity_from(self, claims: dict[str, Any], via: str) -> Identity:
        """§13: id_prefix + sub, name or sub, roles cut to allowed_roles, channel grants."""
        sub, name, roles = claims.get("sub"), claims.get("name"), claims.get("roles", [])
        if not isinstance(sub, str) or not sub or len(sub) > MAX_SUB_LENGTH:
            raise InvalidToken(f"sub must be a string of 1 to {MAX_SUB_LENGTH} characters")
        if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
            raise InvalidToken("roles must be a list of strings")
        if not isinstance(claims["exp"], int | float) or not isinstance(claims["iat"], int | float):
            raise InvalidToken("exp and iat must be numbers")
        if claims["exp"] - claims["iat"] > self.settings.max_token_ttl:
            # A revocation lasts max_token_ttl: a longer-lived token would outlive it.
            raise InvalidToken(f"the token lives longer than max_token_ttl ({self.settings.max_token_ttl} s)")
        identity_id = self.settings.id_prefix + sub
        try:
            grants = compile_grants(claims.get("channels"), identity_id)
        except ValueError as exc:
            raise InvalidToken(f"channels: {exc}") from None
        return Identity(
            identity_id,
            name if isinstance(name, str) and name else sub,
            frozenset(roles).intersection(self.settings.allowed_roles),
            via=via,
            expires=float(claims["exp"]),
            issued_at=float(claims["iat"]),
            grants=grants,
        )


class Issuers:
    """Every configured issuer, found by the `iss` a token names."""

    def __init__(self, settings: Iterable[IssuerSettings]) -> None:
        self.by_iss = {s.issuer: Issuer(s) for s in settings}
        for issuer in self.by_iss.values():
            if issuer.settings.public_key_file or issuer.settings.jwks_file:
                issuer.keys = issuer.read_key_file()  # checked at start-up already

    def get(self, iss: Any) -> Issuer | None:
        return self.by_iss.get(iss) if isinstance(iss, str) else None

    async def start(self) -> None:
        """Open the HTTP client and fetch every jwks_url once (a failure is logged, not fatal)."""
        if any(i.settings.jwks_url for i in self.by_iss.values()):
            http = aiohttp.ClientSession(headers={"Accept": "application/json"})
            for issuer in self.by_iss.values():
                issuer.http = http
        await asyncio.gather(*(i.load() for i in self.by_iss.values() if i.settings.jwks_url))

    async def refresh_forever(self, interval: float = REFRESH_INTERVAL) -> None:
        """Re-read every JWKS now and then, so a key the application removed stops verifying."""
        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(i.load() for i in self.by_iss.values() if i.rereadable))

    async def close(self) -> None:
        https = {i.http for i in self.by_iss.values() if i.http is not None}
        for http in https:
            await http.close()
        for issuer in self.by_iss.values():
            issuer.http = None
