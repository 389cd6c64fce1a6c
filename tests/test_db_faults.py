"""Faults from a database going away answer honestly (issue 10).

A publish that committed answers 201 whatever breaks afterwards (else a retry without an
Idempotency-Key stores it twice); anything else from a database going away is 503, never
500; and /readyz is 200 within a second of the database being back.
"""

from __future__ import annotations

import time

import asyncpg
import pytest

from server.events.committer import is_open
from server.keys import broker_key, pool_key, store_key
from server.ops.logs import request_id_var
from tests.conftest import wait_for
from tests.helpers import bearer, token_for

BROKEN_RELEASE = "cannot switch to state 15; another operation is in progress"  # what asyncpg raised


class BreakingRelease:
    """Once armed, the next connection a request gives back to the app's pool is killed by the server
    first (as in a restart), and its release raises what asyncpg raised then: after the
    statement committed."""

    def __init__(self, pool: asyncpg.Pool, database_url: str) -> None:
        self.pool = pool
        self.real_release = asyncpg.pool.Pool.release
        self.database_url = database_url
        self.armed = False
        self.broken: list[int] = []

    async def release(self, pool: asyncpg.Pool, conn, *, timeout=None):
        # Only a request's own release: the app's background jobs share the pool.
        if pool is not self.pool or not self.armed or request_id_var.get() is None:
            return await self.real_release(pool, conn, timeout=timeout)
        self.armed = False
        self.broken.append(conn.get_server_pid())
        admin = await asyncpg.connect(self.database_url)
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", self.broken[-1])
        finally:
            await admin.close()
        await self.real_release(pool, conn, timeout=timeout)
        raise asyncpg.InternalClientError(BROKEN_RELEASE)


@pytest.fixture
def breaking_release(client, database_url, monkeypatch) -> BreakingRelease:
    pool = client.app[pool_key]
    breaker = BreakingRelease(pool, database_url)

    async def release(pool, conn, *, timeout=None):  # Pool has __slots__: patched on the class
        return await breaker.release(pool, conn, timeout=timeout)

    monkeypatch.setattr(asyncpg.pool.Pool, "release", release)
    return breaker


async def test_a_keyed_batch_that_committed_answers_201_when_its_connection_breaks_after(client, breaking_release):
    """A batch with an Idempotency-Key commits on a pooled connection of its own."""
    pub = await token_for(client, "pub", ("publisher",))
    await client.get("/api/me", headers=bearer(pub))  # the user is cached: the publish is the next release
    body = {"events": [{"channel": "news", "data": 1}]}
    breaking_release.armed = True
    resp = await client.post("/api/events", json=body, headers=bearer(pub) | {"Idempotency-Key": "key-1"})
    assert breaking_release.broken, "the release was not broken"
    assert resp.status == 201, await resp.text()
    assert [(e["offset"], e["data"]) for e in (await resp.json())["items"]] == [(1, 1)]
    assert [e.offset for e in await client.app[store_key].history("news", 0, 10)] == [1]
    # The broken connection was not handed out again.
    resp = await client.post("/api/channels/news/events", json={"data": 2}, headers=bearer(pub))
    assert resp.status == 201, await resp.text()


async def test_the_group_commit_takes_a_fresh_connection_when_the_database_closed_its_own(client, database_url):
    """Flights keep one connection between them; one the server closed is never used again."""
    pub = await token_for(client, "pub", ("publisher",))
    assert (await client.post("/api/channels/news/events", json={"data": 1}, headers=bearer(pub))).status == 201
    (kept,) = client.app[store_key].committer._idle  # the one flight's, kept for the next

    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", kept.get_server_pid())
    finally:
        await admin.close()
    await wait_for(lambda: not is_open(kept), timeout=10)
    resp = await client.post("/api/channels/news/events", json={"data": 2}, headers=bearer(pub))
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["offset"] == 2
    assert kept not in client.app[store_key].committer._idle


async def test_a_connection_breaking_on_its_way_back_is_503_on_readyz_not_500(client, breaking_release):
    breaking_release.armed = True
    resp = await client.get("/readyz")
    assert breaking_release.broken
    assert resp.status == 503, await resp.text()
    assert (await resp.json())["code"] == "unavailable"
    await wait_for(lambda: ready(client), timeout=10)


async def ready(client) -> bool:
    return (await client.get("/readyz")).status == 200


async def test_readyz_is_200_within_a_second_of_the_database_being_back(client, postgres):
    """After an outage long enough for the listener's backoff to reach seconds."""
    postgres.require_embedded()
    broker = client.app[broker_key]
    postgres.stop()
    try:
        # The listener has just begun a wait of 3.2 s or more before its next attempt.
        await wait_for(lambda: not broker.connected and broker.retry_in >= 3.2, timeout=60, interval=0.01)
    finally:
        postgres.start()
    back = time.monotonic()
    await wait_for(lambda: ready(client), timeout=10, interval=0.05)
    assert time.monotonic() - back < 1.0
