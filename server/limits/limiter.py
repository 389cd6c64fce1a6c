"""Token buckets shared by every worker process of the server.

The buckets live in one anonymous shared memory map created before the workers are
forked, so a key's limit holds for the whole server, not per process. Each slot is
(key hash, tokens, last refill time); keys hash into a small neighbourhood of slots,
and a full neighbourhood reuses its stalest slot: a bucket idle long enough to refill
completely is the same as no bucket, so nothing a client is owed is ever lost there.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import math
import mmap
import os
import struct
import tempfile
import time
from dataclasses import dataclass

from server.errors import RateLimited
from server.identity.auth import Identity
from server.limits.connections import LOCK_STRIPES as CONNECTION_LOCK_STRIPES
from server.limits.connections import ConnectionCounts, salted_key_hash
from server.settings import LimitsSettings

SLOT = struct.Struct("=qdd")  # key hash, tokens, last refill (monotonic seconds)
PROBES = 8
LOCK_STRIPES = 64
MUTEX_STRIDE = 64  # bytes per pthread_mutex_t (40 on x86-64 glibc, 48 on arm64), one cache line each
EOWNERDEAD = 130  # Linux
PTHREAD_PROCESS_SHARED, PTHREAD_MUTEX_ROBUST = 1, 1


class RobustLocks:
    """Process-shared robust pthread mutexes in an anonymous shared map, one per stripe.

    Why not fcntl record locks (used before): each take() paid two system calls for them,
    the largest part of a rate-limited request's cost after aiohttp's own. An uncontended
    pthread mutex is an atomic instruction in user space. Robust, like the fcntl locks: if
    a worker dies holding one, the next taker is told (EOWNERDEAD), marks it consistent and
    goes on, so a killed worker blocks nobody.
    """

    def __init__(self, stripes: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        for name in ("pthread_mutex_lock", "pthread_mutex_unlock", "pthread_mutex_consistent"):
            fn = getattr(libc, name)
            fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_size_t]
        self._memory = mmap.mmap(-1, stripes * MUTEX_STRIDE)  # MAP_SHARED | MAP_ANONYMOUS: survives fork
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
        attr = ctypes.create_string_buffer(64)  # pthread_mutexattr_t is 4 bytes on Linux
        checks = [
            libc.pthread_mutexattr_init(attr),
            libc.pthread_mutexattr_setpshared(attr, PTHREAD_PROCESS_SHARED),
            libc.pthread_mutexattr_setrobust(attr, PTHREAD_MUTEX_ROBUST),
        ]
        self.addresses = [base + n * MUTEX_STRIDE for n in range(stripes)]
        checks += [libc.pthread_mutex_init(ctypes.c_void_p(a), attr) for a in self.addresses]
        if any(checks):
            raise OSError(f"pthread mutex set-up failed: {checks}")
        self._lock = libc.pthread_mutex_lock
        self._unlock = libc.pthread_mutex_unlock
        self._consistent = libc.pthread_mutex_consistent

    def acquire(self, stripe: int) -> None:
        address = self.addresses[stripe]
        if self._lock(address) == EOWNERDEAD:  # its holder died inside take(): the slot is still usable
            self._consistent(address)

    def release(self, stripe: int) -> None:
        self._unlock(self.addresses[stripe])


class FcntlLocks:
    """fcntl record locks on an unlinked file, one byte per stripe (where pthread robust
    mutexes are not available): the kernel drops a lock when its holder dies."""

    def __init__(self, stripes: int) -> None:
        self._fd, path = tempfile.mkstemp(prefix="herald-limiter-")
        os.unlink(path)

    def acquire(self, stripe: int) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, stripe)

    def release(self, stripe: int) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, stripe)

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self._fd)


def stripe_locks(stripes: int) -> RobustLocks | FcntlLocks:
    try:
        return RobustLocks(stripes)
    except (OSError, AttributeError):  # no glibc, or no robust mutexes
        return FcntlLocks(stripes)


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
        # One lock per stripe of blocks, which a worker killed inside take() does not keep.
        self.locks = stripe_locks(LOCK_STRIPES)
        self.key_hash = salted_key_hash()
        # Open WebSocket/SSE connections per address and identity, shared the same way.
        self.connections = ConnectionCounts(stripe_locks(CONNECTION_LOCK_STRIPES))

    def take(self, key: str, rate: float, burst: int, now: float | None = None) -> Decision:
        """Take one token from key's bucket (refilling at rate tokens/s, holding at most burst)."""
        h = self.key_hash(key)
        block = h % self.blocks
        stripe = block % LOCK_STRIPES
        self.locks.acquire(stripe)
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
            self.locks.release(stripe)
        return decision(allowed, tokens, rate, burst)

    def refund(self, key: str, burst: int) -> None:
        """Give back the token a take() drew (login refunds it when the password was right)."""
        h = self.key_hash(key)
        block = h % self.blocks
        stripe = block % LOCK_STRIPES
        self.locks.acquire(stripe)
        try:
            offset, found = self._slot(h, block)
            if found:
                _, tokens, last = SLOT.unpack_from(self._memory, offset)
                SLOT.pack_into(self._memory, offset, h, min(float(burst), tokens + 1.0), last)
        finally:
            self.locks.release(stripe)

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
