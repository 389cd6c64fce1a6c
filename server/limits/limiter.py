"""Token buckets shared by every worker process of the server.

The buckets live in one anonymous shared memory map created before the workers are
forked, so a key's limit holds for the whole server, not per process. Each slot is
(key hash, tokens, last refill time); keys hash into a small neighbourhood of slots,
and a full neighbourhood reuses its stalest slot: a bucket idle long enough to refill
completely is the same as no bucket, so nothing a client is owed is ever lost there.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import math
import mmap
import os
import struct
import tempfile
import time
from dataclasses import dataclass

from server.errors import RateLimited
from server.identity.auth import Identity
from server.limits.connections import ConnectionCounts
from server.settings import LimitsSettings

SLOT = struct.Struct("=qdd")  # key hash, tokens, last refill (monotonic seconds)
PROBES = 8
LOCK_STRIPES = 64


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int  # the burst: what RateLimit-Limit shows
    remaining: int
    reset: int  # whole seconds until the bucket is full again (at least 1)
    retry_after: int  # whole seconds until one request is allowed (at least 1)


class RateLimiter:
    """Create before forking; every process then shares the same buckets."""

    def __init__(self, blocks: int = 8192) -> None:
        self.blocks = blocks
        self._memory = mmap.mmap(-1, blocks * PROBES * SLOT.size)  # MAP_SHARED | MAP_ANONYMOUS: survives fork
        # fcntl record locks on an unlinked file, one byte per stripe: the kernel drops a
        # lock when its holder dies, so a worker killed inside take() blocks nobody.
        self._lock_fd, path = tempfile.mkstemp(prefix="herald-limiter-")
        os.unlink(path)
        # A secret per server start, drawn before the workers fork so all share it: nobody
        # can pick keys that land in another key's neighbourhood and push that bucket out.
        salt = os.urandom(16)

        @functools.lru_cache(maxsize=65536)
        def key_hash(key: str) -> int:
            digest = hashlib.blake2b(key.encode(), digest_size=8, key=salt).digest()
            return int.from_bytes(digest, "little", signed=True) or 1

        self.key_hash = key_hash
        # Open WebSocket/SSE connections per address and identity, shared the same way.
        self.connections = ConnectionCounts()

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self._lock_fd)

    def take(self, key: str, rate: float, burst: int, now: float | None = None) -> Decision:
        """Take one token from key's bucket (refilling at rate tokens/s, holding at most burst)."""
        h = self.key_hash(key)
        block = h % self.blocks
        stripe = block % LOCK_STRIPES
        fcntl.lockf(self._lock_fd, fcntl.LOCK_EX, 1, stripe)
        try:
            # Read the clock holding the lock: a reading taken before waiting could be older
            # than the one another process just stored, and would move `last` back (refill twice).
            now = time.monotonic() if now is None else now
            offset, found = self._slot(h, block)
            if found:
                _, tokens, last = SLOT.unpack_from(self._memory, offset)
                tokens = min(float(burst), tokens + max(0.0, now - last) * rate)
            else:
                tokens = float(burst)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            SLOT.pack_into(self._memory, offset, h, tokens, now)
        finally:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, stripe)
        return decision(allowed, tokens, rate, burst)

    def refund(self, key: str, burst: int) -> None:
        """Give back the token a take() drew (login refunds it when the password was right)."""
        h = self.key_hash(key)
        block = h % self.blocks
        stripe = block % LOCK_STRIPES
        fcntl.lockf(self._lock_fd, fcntl.LOCK_EX, 1, stripe)
        try:
            offset, found = self._slot(h, block)
            if found:
                _, tokens, last = SLOT.unpack_from(self._memory, offset)
                SLOT.pack_into(self._memory, offset, h, min(float(burst), tokens + 1.0), last)
        finally:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, stripe)

    def take_request(self, limits: LimitsSettings, key: str) -> Decision | None:
        """One request's (or WebSocket publish's) token; None when limiting is off (rate = 0)."""
        if limits.rate <= 0:
            return None
        return self.take(key, limits.rate, limits.burst)

    def _slot(self, h: int, block: int) -> tuple[int, bool]:
        """h's slot in its block, or the free or stalest slot to take over."""
        base = block * PROBES * SLOT.size
        reuse, reuse_time = base, math.inf
        for probe in range(PROBES):
            offset = base + probe * SLOT.size
            stored, _, last = SLOT.unpack_from(self._memory, offset)
            if stored == h:
                return offset, True
            if stored == 0:
                return offset, False
            if last < reuse_time:
                reuse, reuse_time = offset, last
        return reuse, False


def decision(allowed: bool, tokens: float, rate: float, burst: int) -> Decision:
    missing = burst - tokens
    reset = math.ceil(missing / rate) if rate > 0 and missing > 0 else 1
    retry_after = 1 if allowed or rate <= 0 else math.ceil((1.0 - tokens) / rate)
    return Decision(allowed, burst, int(tokens), max(1, reset), max(1, retry_after))


def bucket_key(identity: Identity | None, ip: str) -> str:
    """Callers are limited per user when authenticated, else per client IP."""
    return f"user:{identity.id}" if identity is not None else f"ip:{ip}"


def refusal(decision: Decision, what: str = "Too many requests") -> RateLimited:
    return RateLimited(f"{what}; retry in {decision.retry_after} s", headers={"Retry-After": str(decision.retry_after)})
