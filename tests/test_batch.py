"""Group commit and the batch endpoints (PROTOCOL §11, issue 12's event-store half).

Coalescing is made to happen on purpose: a Gate holds the committer's flight (its
before_flight hook) until the publishes under test have gathered behind it, so they are
known to share one statement and one commit.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from server.keys import pool_key, store_key
from server.settings import SettingsError
from server.storage import db
from tests.conftest import wait_for
from tests.helpers import WsClient, bearer, publish, token_for


class Gate:
    """Holds every flight of one app's committer until opened; records the batches' shapes."""

    def __init__(self, client) -> None:
        self.committer = client.app[store_key].committer
        self.opened = asyncio.Event()
        self.batches: list[list[int]] = []
        self.committer.before_flight = self.hold

    async def hold(self, batch) -> None:
        self.batches.append([len(request.items) for request in batch])
        await self.opened.wait()

    async def primed(self, client, token: str) -> asyncio.Future:
        """A first publish in every flight the committer may have in the air, each held
        there, so the next ones gather for one batch."""
        primers = []
        for n in range(self.committer.flights):  # one by one: two arriving together would share a flight
            primers.append(asyncio.create_task(publish(client, token, f"public:primer{n}", "primer")))
            await wait_for(lambda n=n: len(self.batches) == n + 1)
        return asyncio.gather(*primers)

    @property
    def gathered_batches(self) -> list[list[int]]:
        """The batches after the primers'."""
        return self.batches[self.committer.flights :]

    async def gathered(self, count: int) -> None:
        try:
            await wait_for(lambda: self.committer.pending == count)
        except AssertionError:
            raise AssertionError(f"{self.committer.pending} gathered, not {count}; batches {self.batches}") from None

    def open(self) -> None:
        self.opened.set()

    def let_one(self) -> None:
        """Let the flight waiting now go on, and hold the next one again."""
        self.opened.set()
        self.opened.clear()


@pytest.fixture
async def pub(client) -> str:
    return await token_for(client, "pub", ("publisher",))


async def post(client, path: str, body: Any, token: str | None = None, **headers: str):
    auth = bearer(token) if token else {}
    return await client.post(
        path, data=orjson.dumps(body), headers={"Content-Type": "application/json"} | auth | headers
    )


async def history(client, channel: str) -> list[dict]:
    resp = await client.get(f"/api/channels/{channel}/events?limit=1000")
    assert resp.status == 200, await resp.text()
    return (await resp.json())["items"]


async def offsets(client, channel: str) -> list[int]:
    return [e["offset"] for e in await history(client, channel)]


# ------------------------------------------------------------ the batch endpoints


async def test_a_batch_is_stored_in_request_order_and_delivered(client, pub):
    ws = await WsClient.connect(client)
    await ws.subscribe("public:a")
    await publish(client, pub, "public:a", "first")
    events = [
        {"channel": "public:a", "type": "t1", "data": 1},
        {"channel": "public:b", "data": {"x": 1}},
        {"channel": "public:a", "type": "t3"},
    ]
    resp = await post(client, "/api/events", {"events": events}, pub)
    assert resp.status == 201, await resp.text()
    items = (await resp.json())["items"]
    assert [(e["channel"], e["offset"], e["type"], e["data"]) for e in items] == [
        ("public:a", 2, "t1", 1),
        ("public:b", 1, "message", {"x": 1}),
        ("public:a", 3, "t3", None),
    ]
    assert [e["offset"] for e in await ws.events(3)] == [1, 2, 3]
    assert await history(client, "public:a") == [(await history(client, "public:a"))[0], items[0], items[2]]


async def test_a_broadcast_stores_one_event_per_channel_in_request_order(client, pub):
    channels = ["public:c3", "public:c1", "public:c2"]
    resp = await post(client, "/api/broadcast", {"channels": channels, "type": "notice", "data": {"n": 1}}, pub)
    assert resp.status == 201, await resp.text()
    items = (await resp.json())["items"]
    assert [(e["channel"], e["offset"], e["type"], e["data"]) for e in items] == [
        (c, 1, "notice", {"n": 1}) for c in channels
    ]


async def test_a_batch_with_one_forbidden_channel_stores_nothing(client, pub):
    body = {"events": [{"channel": "public:ok", "data": 1}, {"channel": "secret:x", "data": 2}]}
    resp = await post(client, "/api/events", body, pub)
    assert resp.status == 403
    assert "secret:x" in (await resp.json())["detail"]
    resp = await post(client, "/api/broadcast", {"channels": ["public:ok", "secret:x"]}, pub)
    assert resp.status == 403
    assert await offsets(client, "public:ok") == []
    resp = await post(client, "/api/events", body)  # anonymous
    assert resp.status == 401
    # Refusal is decided before validation: a forbidden channel beside an invalid item is 403.
    body = {"events": [{"channel": "public:ok", "type": "bad type"}, {"channel": "secret:x"}]}
    assert (await post(client, "/api/events", body, pub)).status == 403


@pytest.mark.parametrize(
    ("events", "field"),
    [
        ([{"channel": "public:ok"}, {"channel": "public:ok", "type": "bad type"}], "events[1].type"),
        ([{"channel": "public:ok"}, {"channel": "bad channel"}], "events[1].channel"),
        ([{"channel": "public:ok"}, {"data": 1}], "events[1].channel"),
        ([{"channel": "public:ok"}, "not an object"], "events[1]"),
        ([{"channel": "public:ok", "extra": 1}], "events[0].extra"),
        ([], "events"),
    ],
)
async def test_a_batch_with_one_invalid_item_stores_nothing(client, pub, events, field):
    resp = await post(client, "/api/events", {"events": events}, pub)
    assert resp.status == 422, await resp.text()
    assert (await resp.json())["errors"][0]["field"] == field
    assert await offsets(client, "public:ok") == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"channels": ["public:a", "public:b", "public:a"]}, "channels[2]"),
        ({"channels": ["public:a", "bad name"]}, "channels[1]"),
        ({"channels": ["public:a"], "type": ""}, "type"),
        ({"channels": []}, "channels"),
        ({"channels": "public:a"}, "channels"),
        ({"channels": ["public:a"], "extra": 1}, "extra"),
    ],
)
async def test_a_bad_broadcast_is_422_naming_the_field_and_stores_nothing(client, pub, body, field):
    resp = await post(client, "/api/broadcast", body, pub)
    assert resp.status == 422, await resp.text()
    assert (await resp.json())["errors"][0]["field"] == field
    assert await offsets(client, "public:a") == []


async def test_batch_limits_count_and_body_bytes(make_client):
    client = await make_client({"limits": {"batch_events": 3, "batch_body_bytes": 300, "body_bytes": 100}})
    token = await token_for(client, "pub", ("publisher",))
    four = {"events": [{"channel": "public:l"}] * 4}
    resp = await post(client, "/api/events", four, token)
    assert resp.status == 422
    assert (await resp.json())["errors"][0]["field"] == "events"
    assert (await post(client, "/api/broadcast", {"channels": [f"public:{i}" for i in range(4)]}, token)).status == 422

    def body_of(size: int) -> bytes:
        head = b'{"events":[{"channel":"public:l","data":"'
        tail = b'"}]}'
        return head + b"x" * (size - len(head) - len(tail)) + tail

    headers = {"Content-Type": "application/json"} | bearer(token)
    resp = await client.post("/api/events", data=body_of(300), headers=headers)  # over body_bytes, at the batch limit
    assert resp.status == 201, await resp.text()
    resp = await client.post("/api/events", data=body_of(301), headers=headers)
    assert resp.status == 413
    assert "300" in (await resp.json())["detail"]

    async def chunked():
        yield body_of(301)

    assert (await client.post("/api/events", data=chunked(), headers=headers)).status == 413
    assert await offsets(client, "public:l") == [1]


async def test_idempotent_batch_retries_answer_the_first_result(client, pub):
    other = await token_for(client, "pub2", ("publisher",))
    body = {"events": [{"channel": "public:i", "data": 1}, {"channel": "public:j", "data": 2}]}
    first = await post(client, "/api/events", body, pub, **{"Idempotency-Key": "k1"})
    assert first.status == 201
    again = await post(client, "/api/events", body, pub, **{"Idempotency-Key": "k1"})
    assert again.status == 200
    assert await again.read() == await first.read()
    changed = {"events": [{"channel": "public:i", "data": 3}]}
    assert (await post(client, "/api/events", changed, pub, **{"Idempotency-Key": "k1"})).status == 409
    # Scoped to the caller and to the endpoint.
    assert (await post(client, "/api/events", body, other, **{"Idempotency-Key": "k1"})).status == 201
    cast = {"channels": ["public:i"], "data": 1}
    assert (await post(client, "/api/broadcast", cast, pub, **{"Idempotency-Key": "k1"})).status == 201
    assert (await post(client, "/api/broadcast", cast, pub, **{"Idempotency-Key": "k1"})).status == 200
    assert await offsets(client, "public:i") == [1, 2, 3]
    assert (await post(client, "/api/events", body, pub, **{"Idempotency-Key": "bad key"})).status == 422


async def test_concurrent_duplicate_batches_store_once(client, pub):
    body = {"events": [{"channel": "public:dup", "data": n} for n in range(5)]}
    responses = await asyncio.gather(
        *(post(client, "/api/events", body, pub, **{"Idempotency-Key": "same"}) for _ in range(6))
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] * 5 + [201]
    bodies = {await r.read() for r in responses}
    assert len(bodies) == 1
    assert await offsets(client, "public:dup") == [1, 2, 3, 4, 5]


# ------------------------------------------------------------ group commit


async def test_concurrent_publishes_gather_into_one_statement(client, pub):
    gate = Gate(client)
    ws = await WsClient.connect(client, f"/ws?access_token={pub}")
    await ws.subscribe("public:g")
    primer = await gate.primed(client, pub)
    singles = [asyncio.create_task(publish(client, pub, "public:g", n)) for n in range(5)]
    batch = asyncio.create_task(post(client, "/api/events", {"events": [{"channel": "public:g"}] * 3}, pub))
    ws_publish = asyncio.create_task(ws.request("publish", channel="public:g", data="ws"))
    await gate.gathered(7)
    gate.open()
    await primer
    assert len({(await t)["offset"] for t in singles}) == 5
    assert (await batch).status == 201
    reply = await ws_publish
    assert reply["op"] == "ok", reply
    assert gate.batches[: gate.committer.flights] == [[1]] * gate.committer.flights  # the primers alone
    assert [sorted(b) for b in gate.gathered_batches] == [[1, 1, 1, 1, 1, 1, 3]]  # then the rest in one
    assert await offsets(client, "public:g") == list(range(1, 10))


async def test_idempotency_keeps_its_meaning_inside_one_batch(client, pub):
    gate = Gate(client)
    primer = await gate.primed(client, pub)
    path = "/api/channels/public:k/events"

    def keyed(data: Any):
        return asyncio.create_task(
            client.post(path, json={"data": data}, headers=bearer(pub) | {"Idempotency-Key": "key-1"})
        )

    first, same, other = keyed("a"), keyed("a"), keyed("b")
    bystander = asyncio.create_task(publish(client, pub, "public:k", "no key"))
    await gate.gathered(4)
    gate.open()
    await primer
    assert gate.gathered_batches[0] == [1, 1, 1, 1]
    first, same, other = await first, await same, await other
    assert (first.status, same.status, other.status) == (201, 200, 409)
    assert await first.json() == await same.json()
    assert (await bystander)["offset"] == 2
    assert await offsets(client, "public:k") == [1, 2]


POISON_SQL = """
CREATE FUNCTION herald.test_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.data LIKE '%poison%' THEN
        RAISE EXCEPTION 'poisoned event' USING ERRCODE = 'data_exception';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_poison BEFORE INSERT ON herald.events FOR EACH ROW EXECUTE FUNCTION herald.test_poison();
"""


@pytest.fixture
async def poison(database_url, settings):
    """Events whose data says 'poison' make the database refuse them (a fault of that item only)."""
    conn = await db.connect(database_url)
    try:
        await conn.execute(POISON_SQL)
        yield
    finally:
        await conn.execute("DROP TRIGGER test_poison ON herald.events; DROP FUNCTION herald.test_poison()")
        await conn.close()


async def test_a_publish_that_fails_alone_does_not_fail_the_others_batched_with_it(client, pub, poison):
    gate = Gate(client)
    primer = await gate.primed(client, pub)
    path = "/api/channels/public:p/events"
    before = asyncio.create_task(publish(client, pub, "public:p", "fine 1"))
    bad = asyncio.create_task(client.post(path, json={"data": "poison"}, headers=bearer(pub)))
    bad_batch = asyncio.create_task(
        post(
            client,
            "/api/events",
            {"events": [{"channel": "public:q", "data": "ok"}, {"channel": "public:q", "data": "poison"}]},
            pub,
        )
    )
    after = asyncio.create_task(publish(client, pub, "public:p", "fine 2"))
    await gate.gathered(4)
    gate.open()
    await primer
    assert sorted(gate.gathered_batches[0]) == [1, 1, 1, 2]
    bad, bad_batch = await bad, await bad_batch
    assert bad.status == 422, await bad.text()
    assert bad_batch.status == 422
    assert "poisoned event" in (await bad.json())["detail"]
    assert sorted([(await before)["offset"], (await after)["offset"]]) == [1, 2]
    assert [e["data"] for e in await history(client, "public:p")] in (["fine 1", "fine 2"], ["fine 2", "fine 1"])
    assert await offsets(client, "public:q") == []  # the batch request is all or none


async def test_a_database_outage_in_the_middle_of_a_coalesced_batch_answers_every_waiter_503(make_client, database_url):
    client = await make_client({"database": {"publish_wait": 60}})
    pub = await token_for(client, "pub", ("publisher",))
    await publish(client, pub, "public:o1", "kept")
    ws = await WsClient.connect(client, f"/ws?access_token={pub}")
    gate = Gate(client)
    primer = await gate.primed(client, pub)
    singles = [asyncio.create_task(publish_status(client, pub, f"public:o{n % 2 + 1}")) for n in range(4)]
    batch = asyncio.create_task(post(client, "/api/events", {"events": [{"channel": "public:o1"}] * 3}, pub))
    ws_publish = asyncio.create_task(ws.request("publish", channel="public:o2", data="ws"))
    await gate.gathered(6)
    gate.let_one()
    await primer
    await wait_for(lambda: len(gate.gathered_batches) == 1)
    assert sorted(gate.gathered_batches[0]) == [1, 1, 1, 1, 1, 3]

    # The test holds the events table: the batch's statement has bumped channel offsets
    # when it stops at its first insert into events; then its connection is cut.
    locker = await db.connect(database_url)
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        gate.open()

        async def waiting_backend() -> int | None:
            return await locker.fetchval(
                """SELECT pid FROM pg_stat_activity
                   WHERE wait_event_type = 'Lock' AND query LIKE '%publish_batch%' AND pid <> pg_backend_pid()"""
            )

        backend = await wait_for(waiting_backend, timeout=30)
        await locker.execute("SELECT pg_terminate_backend($1)", backend)
        statuses = [await t for t in singles]
        assert statuses == [503] * 4
        assert (await batch).status == 503
        reply = await ws_publish
        assert (reply["op"], reply["code"]) == ("error", "unavailable")
        await tx.rollback()
    finally:
        await locker.close()
    assert await offsets(client, "public:o1") == [1]
    assert await offsets(client, "public:o2") == []
    assert (await publish(client, pub, "public:o1", "after"))["offset"] == 2  # no gap was left


async def publish_status(client, token: str, channel: str) -> int:
    resp = await client.post(f"/api/channels/{channel}/events", json={"data": 1}, headers=bearer(token))
    return resp.status


async def test_a_request_on_a_channel_held_by_sql_does_not_hold_up_its_batch(make_client, database_url):
    client = await make_client({"database": {"publish_wait": 60}})
    pub = await token_for(client, "pub", ("publisher",))
    gate = Gate(client)
    holder = await db.connect(database_url)
    try:
        tx = holder.transaction()
        await tx.start()
        assert await holder.fetchval("SELECT publish('public:held', 't', '1'::jsonb)") == 1
        primer = await gate.primed(client, pub)
        held = asyncio.create_task(publish(client, pub, "public:held", "rest"))
        free = asyncio.create_task(publish(client, pub, "public:free", "rest"))
        batch_held = asyncio.create_task(
            post(client, "/api/events", {"events": [{"channel": "public:free2"}, {"channel": "public:held"}]}, pub)
        )
        await gate.gathered(3)
        gate.open()
        await primer
        assert (await free)["offset"] == 1  # answered while public:held is still held
        assert not held.done()
        assert not batch_held.done()
        await tx.commit()
    finally:
        await holder.close()
    assert sorted([(await held)["offset"], (await (await batch_held).json())["items"][1]["offset"]]) == [2, 3]
    assert await offsets(client, "public:held") == [1, 2, 3]
    assert await offsets(client, "public:free2") == [1]


async def test_single_and_batch_publishes_racing_from_two_workers_stay_gapless_and_ordered(client, make_client, pub):
    other = await make_client()
    other_pub = await token_for(other, "pub2", ("publisher",))
    channels = ["public:r1", "public:r2"]
    rounds = 12

    async def singles(c, token, source):
        for n in range(rounds):
            await publish(c, token, channels[n % 2], {"s": source, "n": n})

    async def batches(c, token, source):
        for n in range(rounds):
            events = [{"channel": channels[i % 2], "data": {"s": source, "n": n, "i": i}} for i in range(4)]
            resp = await post(c, "/api/events", {"events": events}, token)
            assert resp.status == 201, await resp.text()
            items = (await resp.json())["items"]
            for channel in channels:  # one request's events on one channel: consecutive offsets
                mine = [e["offset"] for e in items if e["channel"] == channel]
                assert mine == list(range(mine[0], mine[0] + len(mine)))

    await asyncio.gather(
        *(singles(c, t, f"s{k}") for k, (c, t) in enumerate(((client, pub), (other, other_pub)) * 2)),
        batches(client, pub, "b0"),
        batches(other, other_pub, "b1"),
    )
    for channel in channels:
        events = await history(client, channel)
        assert [e["offset"] for e in events] == list(range(1, len(events) + 1))
        for source in ("s0", "s1", "s2", "s3", "b0", "b1"):
            seq = [(e["data"]["n"], e["data"].get("i", 0)) for e in events if e["data"]["s"] == source]
            assert seq == sorted(seq)
    total = [len(await history(client, c)) for c in channels]
    assert sum(total) == 4 * rounds + 2 * rounds * 4


def test_batch_limits_are_settings(make_settings):
    settings = make_settings({"limits": {"batch_events": 5, "batch_body_bytes": 10}})
    assert (settings.limits.batch_events, settings.limits.batch_body_bytes) == (5, 10)
    assert (make_settings().limits.batch_events, make_settings().limits.batch_body_bytes) == (1000, 1048576)
    with pytest.raises(SettingsError, match=r"limits\.batch_events"):
        make_settings({"limits": {"batch_events": 0}})


async def test_a_second_flight_is_stored_while_the_first_is_still_in_the_air(make_client):
    """database.publish_flights = 2: publishes arriving while one flight is held go in a
    second flight, on the same channel too, and offsets stay gapless in commit order."""
    client = await make_client({"database": {"publish_flights": 2}})
    pub = await token_for(client, "pub", ("publisher",))
    committer = client.app[store_key].committer
    assert committer.flights == 2
    release = asyncio.Event()
    held: list[list[int]] = []

    async def hold_the_first(batch) -> None:
        if not held:
            held.append([len(r.items) for r in batch])
            await release.wait()

    committer.before_flight = hold_the_first
    first = asyncio.create_task(publish(client, pub, "public:two", "first"))
    await wait_for(lambda: held)
    second = await publish(client, pub, "public:two", "second")  # answered while the first is held
    assert second["offset"] == 1
    assert not first.done()
    release.set()
    assert (await first)["offset"] == 2
    assert [e["data"] for e in await history(client, "public:two")] == ["second", "first"]


def test_auto_flights_are_two_for_a_lone_worker_and_one_each_for_more(make_settings):
    assert make_settings({"server": {"workers": 1}}).publish_flights == 2
    assert make_settings({"server": {"workers": 2}}).publish_flights == 1
    assert make_settings({"server": {"workers": 4}, "database": {"publish_flights": 3}}).publish_flights == 3


async def test_with_one_flight_the_next_publishes_wait_for_it(make_client):
    client = await make_client({"database": {"publish_flights": 1}})
    pub = await token_for(client, "pub", ("publisher",))
    gate = Gate(client)
    primer = await gate.primed(client, pub)
    waiting = asyncio.create_task(publish(client, pub, "public:one", "next"))
    await gate.gathered(1)  # not in a flight of its own: gathered behind the held one
    gate.open()
    await primer
    assert (await waiting)["offset"] == 1
    assert gate.batches == [[1], [1]]


async def test_a_pool_of_one_connection_is_not_kept_by_the_flights(make_client):
    """The flights keep at most pool_size - 1 connections: the rest of Herald needs one too."""
    client = await make_client({"database": {"pool_size": 1}})
    pub = await token_for(client, "pub", ("publisher",))
    assert (await publish(client, pub, "public:solo", 1))["offset"] == 1
    assert client.app[store_key].committer._idle == []
    resp = await asyncio.wait_for(client.get("/api/channels/public:solo/events"), 10)  # the pool's one is free
    assert resp.status == 200


async def test_publishes_may_commit_without_waiting_for_the_wal_flush_when_told(make_client):
    """database.publish_synchronous_commit = false: the flights' own connections only."""
    client = await make_client({"database": {"publish_synchronous_commit": False}})
    pub = await token_for(client, "pub", ("publisher",))
    assert (await publish(client, pub, "public:fast", 1))["offset"] == 1
    (kept, *_) = client.app[store_key].committer._idle
    assert await kept.fetchval("SHOW synchronous_commit") == "off"
    async with client.app[pool_key].acquire() as other:
        assert await other.fetchval("SHOW synchronous_commit") == "on"


async def test_publishes_wait_for_the_wal_flush_by_default(client, pub):
    assert (await publish(client, pub, "public:safe", 1))["offset"] == 1
    (kept, *_) = client.app[store_key].committer._idle
    assert await kept.fetchval("SHOW synchronous_commit") == "on"


async def test_a_publish_right_behind_the_last_one_gets_a_flight_of_its_own(make_client):
    """The next publish can come while the flight that answered the last one is still
    ending (its answer wakes the caller first): it must find room for a flight."""
    client = await make_client({"database": {"publish_flights": 1}})
    store = client.app[store_key]
    for n in range(1, 11):  # each awaited: the next comes the moment the last is answered
        async with asyncio.timeout(10):  # not wait_for: its own task would come a turn later
            event, _ = await store.publish("public:seq", "message", "1")
        assert event.offset == n
