"""Rate limits (PROTOCOL §8 and §10's §8): the shared token buckets, then through real HTTP."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from server.keys import users_key
from server.limits.limiter import LOCK_STRIPES, PROBES, Decision, RateLimiter, RobustLocks
from server.web.net import client_ip, is_tls
from tests.helpers import PASSWORD, add_user, bearer, login, token_for

RATELIMIT_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")
PROXIES = ["127.0.0.1", "::1"]
SLOW = 0.000001  # tokens per second: nothing refills while a test runs


def limits(rate: float = SLOW, burst: int = 3, **extra) -> dict:
    return {"limits": {"rate": rate, "burst": burst, **extra}}


def behind_proxy(raw: dict) -> dict:
    return {"server": {"trusted_proxies": PROXIES}, **raw}


def xff(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


def assert_no_ratelimit_headers(resp) -> None:
    assert not [h for h in RATELIMIT_HEADERS if h in resp.headers], dict(resp.headers)


async def assert_rate_limited(resp) -> None:
    assert resp.status == 429, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    body = await resp.json(content_type=None)
    assert body["code"] == "rate_limited"
    assert body["status"] == 429
    assert int(resp.headers["Retry-After"]) >= 1


# The buckets themselves, with explicit clock readings.


def test_fresh_key_allows_burst_then_refuses():
    limiter = RateLimiter(blocks=16)
    decisions = [limiter.take("k", rate=1, burst=5, now=100.0) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]


def test_refills_at_rate_per_second():
    limiter = RateLimiter(blocks=16)
    for _ in range(4):
        assert limiter.take("k", rate=4, burst=4, now=10.0).allowed
    assert not limiter.take("k", rate=4, burst=4, now=10.0).allowed
    later = [limiter.take("k", rate=4, burst=4, now=10.5).allowed for _ in range(3)]
    assert later == [True, True, False]
    assert limiter.take("k", rate=4, burst=4, now=10.75).allowed


def test_never_more_than_burst_after_long_idle():
    limiter = RateLimiter(blocks=16)
    for _ in range(3):
        limiter.take("k", rate=10, burst=3, now=0.0)
    after_idle = [limiter.take("k", rate=10, burst=3, now=100_000.0).allowed for _ in range(4)]
    assert after_idle == [True, True, True, False]


def test_decision_fields():
    limiter = RateLimiter(blocks=16)
    first = limiter.take("a", rate=2, burst=4, now=0.0)
    assert (first.allowed, first.limit, first.remaining, first.reset, first.retry_after) == (True, 4, 3, 1, 1)
    for _ in range(3):
        last = limiter.take("a", rate=2, burst=4, now=0.0)
    assert (last.allowed, last.remaining, last.reset) == (True, 0, 2)  # 4 missing at 2/s
    refused = limiter.take("a", rate=2, burst=4, now=0.0)
    assert (refused.allowed, refused.limit, refused.remaining, refused.reset, refused.retry_after) == (
        False,
        4,
        0,
        2,
        1,  # 1 token at 2/s: half a second, rounded up to whole seconds
    )
    partly = limiter.take("a", rate=2, burst=4, now=0.75)  # 1.5 tokens: allowed, 0.5 left
    assert (partly.allowed, partly.remaining, partly.reset) == (True, 0, 2)  # 3.5 missing: 1.75 s → 2

    assert limiter.take("slow", rate=0.1, burst=1, now=0.0).reset == 10
    slow = limiter.take("slow", rate=0.1, burst=1, now=0.0)
    assert (slow.allowed, slow.retry_after, slow.reset) == (False, 10, 10)
    slow = limiter.take("slow", rate=0.1, burst=1, now=5.0)  # half a token back
    assert (slow.allowed, slow.retry_after) == (False, 5)

    for decision in (first, last, refused, partly, slow):
        for value in (decision.limit, decision.remaining, decision.reset, decision.retry_after):
            assert type(value) is int
        assert decision.reset >= 1
        assert decision.retry_after >= 1


def test_keys_are_independent():
    limiter = RateLimiter(blocks=16)
    assert limiter.take("a", rate=SLOW, burst=1, now=0.0).allowed
    assert not limiter.take("a", rate=SLOW, burst=1, now=0.0).allowed
    assert limiter.take("b", rate=SLOW, burst=1, now=0.0).allowed
    assert not limiter.take("b", rate=SLOW, burst=1, now=0.0).allowed
    assert not limiter.take("a", rate=SLOW, burst=1, now=0.0).allowed


def test_more_keys_than_the_table_holds():
    limiter = RateLimiter(blocks=4)  # 4 * PROBES slots
    keys = [f"key-{n}" for n in range(100)]
    neighbours = [k for k in keys if limiter.key_hash(k) % 4 == limiter.key_hash("victim") % 4]
    assert len(neighbours) >= PROBES  # enough to push "victim" out of its block

    assert limiter.take("victim", rate=SLOW, burst=2, now=0.0).allowed
    assert limiter.take("victim", rate=SLOW, burst=2, now=0.0).allowed
    assert not limiter.take("victim", rate=SLOW, burst=2, now=0.0).allowed

    for n, key in enumerate(keys, start=1):
        decision = limiter.take(key, rate=SLOW, burst=2, now=float(n))
        assert (decision.allowed, decision.remaining) == (True, 1)
    # The most recent keys are still held: their second request sees the first.
    assert limiter.take(keys[-1], rate=SLOW, burst=2, now=200.0).remaining == 0
    assert not limiter.take(keys[-1], rate=SLOW, burst=2, now=200.0).allowed
    # The stalest bucket was the one reused; the evicted key comes back full.
    back = limiter.take("victim", rate=SLOW, burst=2, now=201.0)
    assert (back.allowed, back.remaining) == (True, 1)


def _take_many(limiter: RateLimiter, start, allowed, count: int) -> None:
    start.wait(10)
    n = 0
    for _ in range(count):
        if limiter.take("shared", rate=SLOW, burst=50).allowed:
            n += 1
    with allowed.get_lock():
        allowed.value += n


def test_buckets_are_shared_across_processes():
    limiter = RateLimiter(blocks=64)
    context = multiprocessing.get_context("fork")
    start = context.Barrier(2)
    allowed = context.Value("i", 0)
    children = [context.Process(target=_take_many, args=(limiter, start, allowed, 100)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(20)
    assert [child.exitcode for child in children] == [0, 0]
    assert allowed.value == 50
    assert not limiter.take("shared", rate=SLOW, burst=50).allowed  # the parent sees the same bucket


# Who the client is.


def mocked_request(peer: str, headers: dict[str, str] | None = None, sslcontext=None):
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda key: {
        "peername": (peer, 40000),
        "sockname": ("127.0.0.1", 8080),
        "sslcontext": sslcontext,
    }.get(key)
    return make_mocked_request("GET", "/api/me", headers=headers, transport=transport)


async def test_client_ip_ignores_forwarded_for_from_untrusted_peer():
    request = mocked_request("203.0.113.9", xff("1.2.3.4"))
    assert client_ip(request, []) == "203.0.113.9"
    assert client_ip(request, ["10.0.0.0/8"]) == "203.0.113.9"


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        ("1.2.3.4, 10.0.0.7", "1.2.3.4"),  # a trusted hop (by CIDR) is skipped
        ("6.6.6.6, 1.2.3.4", "1.2.3.4"),  # a spoofed leftmost address is not believed
        ("6.6.6.6, 1.2.3.4, 10.1.1.1, 10.0.0.2", "1.2.3.4"),
        ("10.0.0.3, 10.0.0.4", "10.0.0.3"),  # all trusted: the leftmost
        ("", "10.0.0.1"),
    ],
)
async def test_client_ip_under_trusted_proxies(forwarded, expected):
    request = mocked_request("10.0.0.1", xff(forwarded) if forwarded else None)
    assert client_ip(request, ["10.0.0.0/8"]) == expected


async def test_client_ip_joins_repeated_forwarded_for_headers():
    from multidict import CIMultiDict

    headers = CIMultiDict([("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "1.2.3.4, 10.0.0.9")])
    request = mocked_request("10.0.0.1", headers)
    assert client_ip(request, ["10.0.0.0/8"]) == "1.2.3.4"


async def test_is_tls():
    assert not is_tls(mocked_request("203.0.113.9"), [])
    assert is_tls(mocked_request("203.0.113.9", sslcontext=mock.Mock()), [])
    proto = {"X-Forwarded-Proto": "https"}
    assert not is_tls(mocked_request("203.0.113.9", proto), ["10.0.0.0/8"])  # untrusted peer
    assert is_tls(mocked_request("10.0.0.1", proto), ["10.0.0.0/8"])
    assert not is_tls(mocked_request("10.0.0.1", {"X-Forwarded-Proto": "http"}), ["10.0.0.0/8"])


# Through HTTP.


async def test_responses_carry_ratelimit_headers_until_429(make_client):
    client = await make_client(limits(rate=0.05, burst=3))
    token = await token_for(client, "alice")
    for remaining in (2, 1, 0):
        resp = await client.get("/api/me", headers=bearer(token))
        assert resp.status == 200
        assert resp.headers["RateLimit-Limit"] == "3"
        assert resp.headers["RateLimit-Remaining"] == str(remaining)
        assert int(resp.headers["RateLimit-Reset"]) >= 1
    resp = await client.get("/api/me", headers=bearer(token))
    await assert_rate_limited(resp)
    assert int(resp.headers["Retry-After"]) == 20  # one token at 0.05/s
    assert resp.headers["RateLimit-Limit"] == "3"
    assert resp.headers["RateLimit-Remaining"] == "0"
    assert int(resp.headers["RateLimit-Reset"]) >= int(resp.headers["Retry-After"])


async def test_rate_one_per_second_headers(make_client):
    client = await make_client(limits(rate=1, burst=3))
    token = await token_for(client, "alice")
    resp = await client.get("/api/me", headers=bearer(token))
    assert resp.headers["RateLimit-Limit"] == "3"
    assert resp.headers["RateLimit-Remaining"] == "2"
    assert resp.headers["RateLimit-Reset"] == "1"


async def test_health_readiness_metrics_and_static_are_never_limited(make_client):
    client = await make_client(limits(burst=1))
    admin = await token_for(client, "root", roles=("admin",))
    for _ in range(5):
        for path, headers, status in (
            ("/healthz", {}, 200),
            ("/readyz", {}, 200),
            ("/metrics", {}, 401),
            ("/metrics", bearer(admin), 200),
            ("/", {}, 200),
        ):
            resp = await client.get(path, headers=headers)
            assert resp.status == status, (path, await resp.text())
            assert_no_ratelimit_headers(resp)
    resp = await client.get("/api/me", headers=bearer(admin))  # the admin's bucket is still full
    assert resp.status == 200
    assert resp.headers["RateLimit-Remaining"] == "0"
    await assert_rate_limited(await client.get("/api/me", headers=bearer(admin)))  # admins are limited too


async def test_anonymous_by_ip_users_by_id(make_client):
    client = await make_client(limits(burst=2))
    alice = await token_for(client, "alice")
    bob = await token_for(client, "bob")
    for _ in range(2):
        assert (await client.get("/api/me")).status == 401  # anonymous, limited all the same
    await assert_rate_limited(await client.get("/api/me"))
    # Same address, but users have their own buckets.
    for token in (alice, bob):
        for remaining in (1, 0):
            resp = await client.get("/api/me", headers=bearer(token))
            assert resp.status == 200
            assert resp.headers["RateLimit-Remaining"] == str(remaining)
        await assert_rate_limited(await client.get("/api/me", headers=bearer(token)))


async def test_forwarded_for_ignored_from_untrusted_peer(make_client):
    client = await make_client(limits(burst=2))
    for address in ("10.0.0.1", "10.0.0.2"):
        assert (await client.get("/api/me", headers=xff(address))).status == 401
    await assert_rate_limited(await client.get("/api/me", headers=xff("10.0.0.3")))
    await assert_rate_limited(await client.get("/api/me"))


async def test_forwarded_for_believed_from_trusted_proxy(make_client):
    client = await make_client(behind_proxy(limits(burst=1)))
    assert (await client.get("/api/me", headers=xff("1.2.3.4"))).status == 401
    await assert_rate_limited(await client.get("/api/me", headers=xff("1.2.3.4")))
    # The client is the rightmost address that is not a trusted proxy.
    await assert_rate_limited(await client.get("/api/me", headers=xff("1.2.3.4, 127.0.0.1")))
    await assert_rate_limited(await client.get("/api/me", headers=xff("9.9.9.9, 1.2.3.4")))
    # Other client addresses have their own buckets.
    assert (await client.get("/api/me", headers=xff("5.6.7.8"))).status == 401
    assert (await client.get("/api/me", headers=xff("1.2.3.4, 5.6.7.9"))).status == 401
    # No X-Forwarded-For: the proxy itself is the client.
    assert (await client.get("/api/me")).status == 401
    await assert_rate_limited(await client.get("/api/me"))


async def test_realtime_connection_attempts_count(make_client):
    client = await make_client(limits(burst=2))
    sse = await client.get("/sse?channel=public:news")
    try:
        assert sse.status == 200
        assert sse.headers["RateLimit-Remaining"] == "1"
        ws = await client.ws_connect("/ws")
        await ws.close()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/ws")
        assert refused.value.status == 429
        assert int(refused.value.headers["Retry-After"]) >= 1
        assert refused.value.headers["RateLimit-Remaining"] == "0"
        await assert_rate_limited(await client.get("/sse?channel=public:news"))
    finally:
        sse.close()


async def test_cors_preflight_is_not_limited(make_client):
    origin = "https://app.example"
    client = await make_client({"cors": {"origins": [origin]}, **limits(burst=1)})
    token = await token_for(client, "alice")
    for _ in range(5):
        resp = await client.options(
            "/api/me",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == origin
        assert_no_ratelimit_headers(resp)
    resp = await client.get("/api/me", headers={"Origin": origin, **bearer(token)})
    assert resp.status == 200
    assert resp.headers["RateLimit-Remaining"] == "0"
    assert "RateLimit-Remaining" in resp.headers["Access-Control-Expose-Headers"]


async def test_rate_zero_turns_limiting_off(make_client):
    client = await make_client(limits(rate=0, burst=1))
    token = await token_for(client, "alice")
    for _ in range(10):
        resp = await client.get("/api/me", headers=bearer(token))
        assert resp.status == 200
        assert_no_ratelimit_headers(resp)
    assert (await client.get("/api/me")).status == 401


# Login's own buckets.


async def test_login_failures_limited_per_ip(make_client):
    client = await make_client({"limits": {"login_rate": 3, "login_ip_rate": 3}})
    await add_user(client, "alice")
    for username in ("bob", "carol", "dave"):
        assert (await login(client, username, "wrong password")).status == 401
    resp = await login(client, "alice", PASSWORD)  # correct, but this address is out of attempts
    await assert_rate_limited(resp)
    assert int(resp.headers["Retry-After"]) == 20  # 3 per minute: one every 20 s


async def attempt_from(client, username: str, password: str, address: str):
    return await client.post("/api/auth/login", json={"username": username, "password": password}, headers=xff(address))


async def test_failures_from_other_addresses_never_lock_an_account_out(make_client):
    """The per-username bucket was spent by anyone's failures: one try every 12 s kept admin out."""
    client = await make_client(behind_proxy({"limits": {"login_rate": 3, "login_ip_rate": 100}}))
    await add_user(client, "alice")
    for i in range(10):
        for _ in range(2):
            assert (await attempt_from(client, "alice", "wrong password", f"10.0.0.{i}")).status == 401
    assert (await attempt_from(client, "ALICE", "wrong password", "10.0.0.1")).status == 401  # names fold case
    await assert_rate_limited(await attempt_from(client, "alice", PASSWORD, "10.0.0.1"))  # this pair is spent
    assert (await attempt_from(client, "alice", PASSWORD, "10.0.1.1")).status == 200  # no failures here
    assert (await attempt_from(client, "bob", "wrong password", "10.0.0.1")).status == 401  # other username, same IP


async def test_failures_per_username_and_address_below_the_address_limit(make_client):
    client = await make_client(behind_proxy({"limits": {"login_rate": 2, "login_ip_rate": 10}}))
    await add_user(client, "alice")
    await add_user(client, "bob")
    for _ in range(2):
        assert (await attempt_from(client, "alice", "wrong password", "10.0.0.1")).status == 401
    await assert_rate_limited(await attempt_from(client, "alice", PASSWORD, "10.0.0.1"))
    assert (await attempt_from(client, "bob", PASSWORD, "10.0.0.1")).status == 200


async def test_a_right_password_costs_no_login_attempt(make_client):
    client = await make_client({"limits": {"login_rate": 3, "login_ip_rate": 3}})
    await add_user(client, "alice")
    for _ in range(8):
        assert (await login(client, "alice", PASSWORD)).status == 200


async def test_refused_credentials_cost_a_token_on_limited_paths_only(make_client):
    client = await make_client({"limits": {"rate": 0.001, "burst": 2}})
    bad = {"Authorization": "Bearer not-a-token"}
    for _ in range(5):  # /healthz is never limited, whatever the credential
        assert (await client.get("/healthz", headers=bad)).status == 401
    first = await client.get("/api/me", headers=bad)
    assert first.status == 401
    assert first.headers["RateLimit-Remaining"] == "1"
    assert (await client.get("/api/me", headers=bad)).status == 401
    guessing = await client.get("/api/me", headers=bad)
    assert guessing.status == 429
    assert int(guessing.headers["Retry-After"]) >= 1


def test_bucket_locks_are_robust_mutexes_not_system_calls():
    assert isinstance(RateLimiter().locks, RobustLocks)  # on Linux with glibc, as Herald ships


def test_a_process_killed_holding_a_bucket_lock_blocks_nobody():
    limiter = RateLimiter()
    key = "user:dies-holding-the-lock"
    stripe = (limiter.key_hash(key) % limiter.blocks) % LOCK_STRIPES
    pid = os.fork()
    if pid == 0:  # a worker killed inside take(), after it took the lock
        limiter.locks.acquire(stripe)
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    answered: list[Decision] = []
    taker = threading.Thread(target=lambda: answered.append(limiter.take(key, 1.0, 5)), daemon=True)
    taker.start()
    taker.join(timeout=10)
    assert answered, "take() still waits for the lock of a dead process"
    assert answered[0].allowed
    assert limiter.take(key, 1.0, 5).remaining == 3  # and the lock works as a lock afterwards


# The bcrypt queue (issue 11).


async def test_a_full_bcrypt_queue_answers_503_with_retry_after_at_once(make_client):
    client = await make_client({"auth": {"bcrypt_queue": 2}})
    await add_user(client, "alice")
    hashing = client.app[users_key].hashing
    async with hashing.slot(), hashing.slot():  # two password checks in flight: the queue is full
        resp = await login(client, "alice", PASSWORD)
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["code"] == "unavailable"
    assert (await login(client, "alice", PASSWORD)).status == 200
