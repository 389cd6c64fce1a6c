"""Open WebSocket and SSE connections per client address and per identity, across workers.

Like the rate limiter's buckets, the counts live in one anonymous shared memory map made
before the workers fork, so a cap holds for the whole server. A slot is (key hash, pid,
count): each process only ever changes its own slots, so the count of a worker that dies
is not a number to repair but slots to drop. The supervisor, which reaps the dead
worker, drops them (forget_process); until then the dead worker's connections still
count, which errs on the side of the cap for the moments it takes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

SLOT = struct.Struct("=qqq")  # key hash, pid, open connections of that pid
PROBES = 32  # slots per neighbourhood: one per (key, worker) that has connections open
LOCK_STRIPES = 64
IPV6_PREFIX = 64  # an IPv6 client owns a whole /64: count its addresses as one


def address_key(ip: str) -> str:
    """The key an address counts under: itself, or its /64 for IPv6."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return f"ip:{ip}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"ip:{address.ipv4_mapped}"
        return f"ip:{ipaddress.ip_network(f'{address}/{IPV6_PREFIX}', strict=False)}"
    return f"ip:{address}"


class StripeLocks(Protocol):
    def acquire(self, stripe: int) -> None: ...
    def release(self, stripe: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Refused:
    """Which cap refused a connection: for the 429 and the log line."""

    what: str  # "address" or "identity"
    cap: int


def salted_key_hash() -> Callable[[str], int]:
    """A key's slot hash, keyed by a secret drawn per server start (before the workers fork,
    so all share it): nobody can pick keys that land in another key's neighbourhood and push
    its slot out. Any str hashes, lone surrogates included (an application token's sub may
    hold one)."""
    salt = os.urandom(16)

    @functools.lru_cache(maxsize=65536)
    def key_hash(key: str) -> int:
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8, key=salt).digest()
        return int.from_bytes(digest, "little", signed=True) or 1

    return key_hash


class ConnectionCounts:
    """Create before forking; every process then shares the same counts."""

    def __init__(self, locks: StripeLocks, blocks: int = 4096) -> None:
        """`locks`: LOCK_STRIPES process-shared locks that a dead holder does not keep (the
        rate limiter's kind, server/limits/limiter.py's stripe_locks)."""
        self.blocks = blocks
        self._memory = mmap.mmap(-1, blocks * PROBES * SLOT.size)
        self.locks = locks
        self.key_hash = salted_key_hash()

    @contextlib.contextmanager
    def _locked(self, block: int) -> Iterator[None]:
        stripe = block % LOCK_STRIPES
        self.locks.acquire(stripe)
        try:
            yield
        finally:
            self.locks.release(stripe)

    def _slots(self, block: int) -> Iterator[tuple[int, int, int, int]]:
        base = block * PROBES * SLOT.size
        for probe in range(PROBES):
            offset = base + probe * SLOT.size
            yield (offset, *SLOT.unpack_from(self._memory, offset))

    def total(self, key: str) -> int:
        h = self.key_hash(key)
        block = h % self.blocks
        with self._locked(block):
            return sum(count for _, stored, _, count in self._slots(block) if stored == h)

    def acquire(self, key: str, cap: int) -> bool:
        """Count one more connection of key in this process, unless key already has cap open.

        A neighbourhood with no free slot refuses too: the caps fail closed.
        """
        h = self.key_hash(key)
        block = h % self.blocks
        pid = os.getpid()
        with self._locked(block):
            total, mine, free = 0, None, None
            for offset, stored, owner, count in self._slots(block):
                if stored == h:
                    total += count
                if stored == h and owner == pid:
                    mine = (offset, count)
                elif count <= 0 and free is None:
                    free = offset
            if total >= cap:
                return False
            if mine is not None:
                SLOT.pack_into(self._memory, mine[0], h, pid, mine[1] + 1)
            elif free is not None:
                SLOT.pack_into(self._memory, free, h, pid, 1)
            else:
                return False
            return True

    def release(self, key: str) -> None:
        h = self.key_hash(key)
        block = h % self.blocks
        pid = os.getpid()
        with self._locked(block):
            for offset, stored, owner, count in self._slots(block):
                if stored == h and owner == pid:
                    SLOT.pack_into(self._memory, offset, h, pid, max(0, count - 1))
                    return

    def forget_process(self, pid: int) -> None:
        """A worker is gone (the supervisor reaped it): its connections no longer count."""
        for block in range(self.blocks):
            with self._locked(block):
                for offset, _, owner, count in self._slots(block):
                    if owner == pid and count:
                        SLOT.pack_into(self._memory, offset, 0, 0, 0)


class Lease:
    """One open connection's places in the counts; released exactly once."""

    __slots__ = ("counts", "keys")

    def __init__(self, counts: ConnectionCounts, keys: list[str]) -> None:
        self.counts = counts
        self.keys = keys

    def release(self) -> None:
        keys, self.keys = self.keys, []
        for key in keys:
            self.counts.release(key)

    def add_identity(self, identity_id: str, cap: int) -> bool:
        """An anonymous connection that identified itself (the WebSocket `auth` op) counts
        under that identity from now on, unless the identity is at its cap."""
        key = f"id:{identity_id}"
        if key in self.keys:
            return True
        if not self.counts.acquire(key, cap):
            return False
        self.keys.append(key)
        return True


def open_connection(
    counts: ConnectionCounts, ip: str, identity_id: str | None, per_address: int, per_identity: int
) -> Lease | Refused:
    """Count a new WebSocket or SSE connection under its address and identity, or say which cap is full."""
    wanted = [(address_key(ip), per_address, "address")]
    if identity_id is not None:
        wanted.append((f"id:{identity_id}", per_identity, "identity"))
    taken: list[str] = []
    for key, cap, what in wanted:
        if not counts.acquire(key, cap):
            Lease(counts, taken).release()
            return Refused(what, cap)
        taken.append(key)
    return Lease(counts, taken)
