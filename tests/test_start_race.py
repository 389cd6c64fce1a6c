"""PROTOCOL §10a: an event committed once a client sees its stream open reaches it.

The race is made to happen on purpose: the hub's subscribe is held at a barrier (between
registering the subscription and reading where the channel stands) while the test publishes.
"""

from __future__ import annotations

import asyncio

import pytest

from server.keys import hub_key
from tests.helpers import SseClient, WsClient, publish, token_for

DEADLINE = 10.0
CHANNEL = "public:race"


class SubscribeBarrier:
    """hub.subscribe_hook: every subscribe waits here until the test releases it."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.released = asyncio.Event()
        self.connections: list = []

    async def __call__(self, conn, channel: str) -> None:
        self.connections.append(conn)
        self.entered.set()
        await self.released.wait()


@pytest.fixture
def barrier(client):
    hub = client.app[hub_key]
    hub.subscribe_hook = SubscribeBarrier()
    yield hub.subscribe_hook
    hub.subscribe_hook.released.set()
    hub.subscribe_hook = None


@pytest.mark.parametrize("credential", ["anonymous", "access_token"])
async def test_sse_an_event_committed_after_the_headers_arrive_is_delivered(client, barrier, credential):
    pub = await token_for(client, "pub", ("publisher",))
    await publish(client, pub, CHANNEL, {"n": 0})
    query = f"channel={CHANNEL}"
    if credential == "access_token":
        query += f"&access_token={await token_for(client, 'sub', ('subscriber',))}"
    opening = asyncio.create_task(SseClient.connect(client, query))
    await asyncio.wait_for(barrier.entered.wait(), DEADLINE)
    # Held in subscribe. If the headers went out already, the client sees the stream open now
    # and publishes; otherwise it can only see it after the subscribe is released.
    if barrier.connections[0].response.prepared:
        stream = await asyncio.wait_for(opening, DEADLINE)
        await publish(client, pub, CHANNEL, {"n": 1})
        barrier.released.set()
    else:
        assert not opening.done()
        barrier.released.set()
        stream = await asyncio.wait_for(opening, DEADLINE)
        await publish(client, pub, CHANNEL, {"n": 1})
    try:
        [event] = await stream.events(1)
        assert (event["offset"], event["data"]) == (2, {"n": 1})
    finally:
        stream.close()


async def test_websocket_an_event_committed_after_the_subscribe_ok_is_delivered(client, barrier):
    pub = await token_for(client, "pub", ("publisher",))
    await publish(client, pub, CHANNEL, {"n": 0})
    ws = await WsClient.connect(client)
    message_id = await ws.send("subscribe", channel=CHANNEL)
    await asyncio.wait_for(barrier.entered.wait(), DEADLINE)
    # No ok can have been sent while the subscribe is held: the subscription is not open yet.
    barrier.released.set()
    reply = await ws.receive()
    assert (reply["op"], reply["id"], reply["offset"]) == ("ok", message_id, 1)
    await publish(client, pub, CHANNEL, {"n": 1})
    [event] = await ws.events(1)
    assert (event["offset"], event["data"]) == (2, {"n": 1})
    await ws.ws.close()


async def test_sse_headers_wait_for_every_channel_of_the_stream(client, barrier):
    """A multi-channel stream opens once all its channels have their starting positions."""
    pub = await token_for(client, "pub", ("publisher",))
    opening = asyncio.create_task(SseClient.connect(client, "channel=public:a&channel=public:b"))
    await asyncio.wait_for(barrier.entered.wait(), DEADLINE)
    assert not barrier.connections[0].response.prepared
    barrier.released.set()
    stream = await asyncio.wait_for(opening, DEADLINE)
    try:
        await publish(client, pub, "public:b", {"n": 1})
        [event] = await stream.events(1)
        assert event["channel"] == "public:b"
    finally:
        stream.close()
