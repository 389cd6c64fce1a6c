"""Caps on open WebSockets and SSE streams (per address, per identity, across workers) and on
the subscriptions of one WebSocket (issue 11)."""

from __future__ import annotations

import logging
import multiprocessing
import os

import aiohttp
import pytest

from server.app import create_app
from server.limits.connections import ConnectionCounts, address_key, open_connection
from server.limits.limiter import RateLimiter, stripe_locks
from tests.conftest import wait_for
from tests.helpers import SseClient, WsClient, bearer, token_for

DEADLINE = 10.0


@pytest.fixture
async def two_workers(aiohttp_client, make_settings, settings):
    """Two apps sharing one limiter, as the supervisor's workers do (and one database)."""

    async def make(limits: dict):
        limiter = RateLimiter()
        raw = {"limits": {**limits}}
        return [await aiohttp_client(create_app(make_settings(raw), limiter=limiter)) for _ in range(2)]

    return make


async def refused_upgrade(client, **kwargs) -> aiohttp.WSServerHandshakeError:
    with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
        await client.ws_connect("/ws", **kwargs)
    return raised.value


async def test_connections_per_address_are_capped_across_workers_and_freed_on_close(two_workers, caplog):
    a, b = await two_workers({"connections_per_ip": 3})
    first = await WsClient.connect(a)
    await WsClient.connect(b)
    stream = await SseClient.connect(b, "channel=public:x")
    refused = await refused_upgrade(a)
    assert refused.status == 429
    resp = await a.get("/sse?channel=public:x")
    assert resp.status == 429
    body = await resp.json()
    assert body["code"] == "rate_limited"
    assert int(resp.headers["Retry-After"]) >= 1
    assert "open connections" in body["detail"]
    refusals = [r for r in caplog.records if r.name == "herald.limits"]
    assert len(refusals) == 1  # two refusals on one worker, one line: the log cannot be flooded
    assert refusals[0].per == "address"

    await first.ws.close()
    stream.close()

    async def admitted() -> bool:
        try:
            await WsClient.connect(a)
        except aiohttp.WSServerHandshakeError:
            return False
        return True

    await wait_for(admitted, timeout=DEADLINE)


async def test_connections_per_identity_are_capped_across_workers(two_workers):
    a, b = await two_workers({"connections_per_ip": 1000, "connections_per_identity": 2})
    token = await token_for(a, "alice")
    other = await token_for(a, "bob")
    await WsClient.connect(a, headers=bearer(token))
    await SseClient.connect(b, "channel=public:x", headers=bearer(token))
    assert (await refused_upgrade(b, headers=bearer(token))).status == 429
    assert (await a.get("/sse?channel=public:x", headers=bearer(token))).status == 429
    await WsClient.connect(b, headers=bearer(other))  # another identity from the same address
    await WsClient.connect(a)  # and anonymous ones


def hold_one_and_die(counts: ConnectionCounts, ready) -> None:
    assert counts.acquire("ip:10.0.0.1", 10)
    ready.put(os.getpid())
    os._exit(0)  # dies holding it, as a killed worker would


def test_a_dead_workers_connections_are_dropped_when_the_supervisor_reaps_it():
    counts = ConnectionCounts(stripe_locks(64), blocks=16)
    ready = multiprocessing.get_context("fork").SimpleQueue()
    child = multiprocessing.get_context("fork").Process(target=hold_one_and_die, args=(counts, ready))
    child.start()
    pid = ready.get()
    child.join()
    assert counts.acquire("ip:10.0.0.1", 10)
    assert counts.total("ip:10.0.0.1") == 2  # the dead one's still counts until it is reaped
    counts.forget_process(pid)
    assert counts.total("ip:10.0.0.1") == 1
    counts.release("ip:10.0.0.1")
    assert counts.total("ip:10.0.0.1") == 0


def test_an_ipv6_client_counts_its_whole_64_as_one_address():
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == "ip:2001:db8::/64"
    assert address_key("::ffff:10.0.0.1") == address_key("10.0.0.1") == "ip:10.0.0.1"
    counts = ConnectionCounts(stripe_locks(64), blocks=4)
    held = [open_connection(counts, f"2001:db8::{i}", None, 2, 2) for i in range(3)]
    assert [type(h).__name__ for h in held] == ["Lease", "Lease", "Refused"]


async def test_subscriptions_per_websocket_are_capped(make_client):
    client = await make_client({"limits": {"channels_per_connection": 3}})
    ws = await WsClient.connect(client)
    for i in range(3):
        await ws.subscribe(f"public:{i}")
    reply = await ws.request("subscribe", channel="public:3")
    assert (reply["op"], reply["code"]) == ("error", "validation_error")
    assert "at most 3" in reply["message"]
    assert (await ws.request("unsubscribe", channel="public:0"))["op"] == "ok"
    await ws.subscribe("public:3")


async def test_subscribes_draw_on_the_rate_limit_like_publishes(make_client):
    client = await make_client({"limits": {"rate": 0.001, "burst": 4}})
    ws = await WsClient.connect(client)  # the upgrade took one token
    for i in range(3):
        await ws.subscribe(f"public:{i}")
    reply = await ws.request("subscribe", channel="public:3")
    assert (reply["op"], reply["code"]) == ("error", "rate_limited")


async def test_a_refused_connection_is_logged_at_warning(two_workers, caplog):
    caplog.set_level(logging.WARNING, logger="herald.limits")
    a, b = await two_workers({"connections_per_ip": 1})
    await WsClient.connect(a)
    assert (await refused_upgrade(a)).status == 429
    assert (await refused_upgrade(b)).status == 429  # counted across workers
    assert any(r.name == "herald.limits" and r.levelno == logging.WARNING for r in caplog.records)


async def test_an_anonymous_websocket_that_identifies_itself_counts_under_that_identity(two_workers):
    a, b = await two_workers({"connections_per_ip": 1000, "connections_per_identity": 1})
    token = await token_for(a, "alice")
    await WsClient.connect(a, headers=bearer(token))
    anonymous = await WsClient.connect(b)
    reply = await anonymous.request("auth", token=token)
    assert (reply["op"], reply["code"]) == ("error", "rate_limited")


def test_an_identity_id_with_a_lone_surrogate_is_counted_like_any_other():
    """An application token's sub is any JSON string, "\\ud800" included: its connections are
    counted, not a UnicodeEncodeError (the rate limiter's buckets already took such keys)."""
    counts = ConnectionCounts(stripe_locks(64), blocks=16)
    assert counts.acquire("id:app:\ud800", 1)
    assert not counts.acquire("id:app:\ud800", 1)
    assert counts.total("id:app:\ud801") == 0
    counts.release("id:app:\ud800")
    assert counts.total("id:app:\ud800") == 0
