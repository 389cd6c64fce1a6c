"""Authorization follows every change on open connections, on every worker (issue 11).

"Two workers" here are two apps in this process, each with its own pool, broker and
hub, sharing the test database: a change made through one reaches the other only the
way it reaches another worker or host, over the users NOTIFY channel.
"""

from __future__ import annotations

import asyncio

import pytest

from server.app import create_app
from tests.conftest import wait_for
from tests.helpers import PASSWORD, SseClient, WsClient, add_user, bearer, login, publish, token_for

DEADLINE = 10.0
RULES = [
    {"pattern": "staff:*", "subscribe": ["staff"], "publish": ["staff"]},
    {"pattern": "public:*", "subscribe": ["anonymous"], "publish": ["publisher"]},
    {"pattern": "*", "subscribe": ["authenticated"], "publish": ["publisher"]},
]


@pytest.fixture
async def workers(aiohttp_client, make_settings, settings):
    """Two apps on one database: what two worker processes are to each other."""
    raw = {"channels": RULES, "auth": {"session_ttl": 3600}}
    return [await aiohttp_client(create_app(make_settings(raw))) for _ in range(2)]


def origin_of(client) -> str:
    return f"http://{client.host}:{client.port}"


def session_cookie(client) -> str:
    cookies = client.session.cookie_jar.filter_cookies(client.make_url("/"))
    return f"herald_session={cookies['herald_session'].value}"


async def ended(sse: SseClient) -> bool:
    """Read until the stream ends; True when it did within the deadline."""
    async with asyncio.timeout(DEADLINE):
        while await sse.response.content.readany():
            pass
    return True


async def test_a_role_change_reaches_open_connections_on_every_worker(workers):
    a, b = workers
    admin = await token_for(a, "root", ("admin",))
    publisher = await token_for(a, "pub", ("publisher", "staff"))
    bob = await token_for(a, "bob", ("staff",))
    sockets = [await WsClient.connect(w, headers=bearer(bob)) for w in workers]
    for ws in sockets:
        await ws.subscribe("staff:news")
        await ws.subscribe("public:lobby")
    stream = await SseClient.connect(b, "channel=staff:news", headers=bearer(bob))
    assert (await stream.message())["retry"] == "3000"
    user_id = sockets[0].welcome["user"]["id"]

    resp = await a.patch(f"/api/users/{user_id}", json={"roles": []}, headers=bearer(admin))
    assert resp.status == 200, await resp.text()

    for ws in sockets:  # the forbidden subscription ends with an error naming it, on both workers
        message = await ws.receive(DEADLINE)
        assert (message["op"], message["code"], message["channel"]) == ("error", "forbidden", "staff:news")
    assert await ended(stream)
    for ws in sockets:  # publishes and subscribes use the current roles
        reply = await ws.request("publish", channel="staff:news", data=1)
        assert (reply["op"], reply["code"]) == ("error", "forbidden")
        reply = await ws.request("subscribe", channel="staff:other")
        assert (reply["op"], reply["code"]) == ("error", "forbidden")
    await publish(a, publisher, "staff:news", "unseen")
    await publish(a, publisher, "public:lobby", "seen")
    for ws in sockets:  # what is still allowed keeps flowing, and nothing of the staff channel arrives
        [event] = await ws.events(1)
        assert (event["channel"], event["data"]) == ("public:lobby", "seen")


async def test_a_role_granted_applies_to_the_next_publish_on_an_open_socket(workers):
    a, b = workers
    admin = await token_for(a, "root", ("admin",))
    bob = await token_for(a, "bob", ())
    ws = await WsClient.connect(b, headers=bearer(bob))
    assert (await ws.request("publish", channel="staff:news", data=1))["code"] == "forbidden"
    user_id = ws.welcome["user"]["id"]
    assert (await a.patch(f"/api/users/{user_id}", json={"roles": ["staff"]}, headers=bearer(admin))).status == 200

    async def allowed() -> bool:
        return (await ws.request("publish", channel="staff:news", data=2))["op"] == "ok"

    await wait_for(allowed, timeout=5)  # PROTOCOL §10a: within 5 s


async def test_logout_ends_every_connection_opened_with_the_session_on_every_worker(workers):
    a, b = workers
    await add_user(a, "alice")
    assert (await login(a)).status == 200
    cookie = session_cookie(a)
    bystander_token = await token_for(a, "carol")
    sockets = [await WsClient.connect(w, headers={"Cookie": cookie}, origin=origin_of(w)) for w in workers]
    for ws in sockets:
        assert ws.welcome["user"]["username"] == "alice"
    stream = await SseClient.connect(b, "channel=public:lobby", headers={"Cookie": cookie})
    bystander = await WsClient.connect(b, headers=bearer(bystander_token))

    resp = await a.post("/api/auth/logout", headers={"Origin": origin_of(a)})
    assert resp.status == 204

    # Both read at once: a client that reads its close frame late cannot answer it any more (1006).
    assert await asyncio.gather(*(ws.closed_with(timeout=DEADLINE) for ws in sockets)) == [4401, 4401]
    assert await ended(stream)
    assert (await bystander.request("ping"))["op"] == "pong"


async def test_a_websocket_opened_with_a_cookie_closes_when_the_session_expires(
    aiohttp_client, make_settings, settings
):
    client = await aiohttp_client(create_app(make_settings({"auth": {"session_ttl": 2}})))
    await add_user(client, "alice")
    assert (await login(client)).status == 200
    ws = await WsClient.connect(client, origin=origin_of(client))
    assert ws.welcome["user"]["username"] == "alice"
    assert await ws.closed_with(timeout=DEADLINE) == 4401


async def test_disabling_deletes_sessions_so_enabling_revives_no_cookie(workers):
    a, b = workers
    admin = await token_for(a, "root", ("admin",))
    alice = await add_user(a, "alice")
    assert (await login(a, "alice", PASSWORD)).status == 200
    cookie = {"Cookie": session_cookie(a)}
    assert (await b.get("/api/me", headers=cookie)).status == 200
    for disabled in (True, False):
        resp = await a.patch(f"/api/users/{alice.id}", json={"disabled": disabled}, headers=bearer(admin))
        assert resp.status == 200
    assert (await b.get("/api/me", headers=cookie)).status == 401
    assert (await login(b, "alice", PASSWORD)).status == 200  # a fresh login works again
