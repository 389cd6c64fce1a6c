"""Publishing, history, channel lists, retention and outages over HTTP (PROTOCOL §3, §4, §10)."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from server.app import create_app
from server.events.store import notification_head
from server.storage import db
from tests.conftest import wait_for
from tests.helpers import SseClient, WsClient, bearer, publish, token_for

TIME_FORMAT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
EVENT_FIELDS = {"channel", "offset", "type", "data", "time"}
NO_RATE_LIMIT = {"limits": {"rate": 100000, "burst": 100000}}  # many requests from one test client


def events_path(channel: str) -> str:
    return f"/api/channels/{channel}/events"


async def post_raw(client, channel: str, body: bytes, headers: dict[str, str] | None = None):
    return await client.post(
        events_path(channel), data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )


async def expect_problem(resp, status: int, code: str, field: str | None = None) -> dict:
    body = await resp.read()
    assert resp.status == status, body
    assert resp.content_type == "application/problem+json"
    problem = orjson.loads(body)
    assert problem["status"] == status
    assert problem["code"] == code
    assert problem["request_id"] == resp.headers["X-Request-Id"]
    if field is not None:
        assert [e["field"] for e in problem["errors"]] == [field], problem
    return problem


async def history(client, channel: str, headers: dict[str, str] | None = None, **params) -> dict:
    resp = await client.get(events_path(channel), params={k: str(v) for k, v in params.items()}, headers=headers)
    body = await resp.read()
    assert resp.status == 200, body
    assert resp.content_type == "application/json"
    return orjson.loads(body)


async def all_events(client, channel: str, headers: dict[str, str] | None = None, limit: int = 100) -> list[dict]:
    """Every stored event of a channel, walking the pages with after=next."""
    found: list[dict] = []
    after = 0
    while True:
        page = await history(client, channel, headers, after=after, limit=limit)
        found.extend(page["items"])
        if page["next"] is None:
            assert len(page["items"]) < limit
            return found
        assert len(page["items"]) == limit
        assert page["next"] == page["items"][-1]["offset"]
        after = page["next"]


async def offsets(client, channel: str, headers: dict[str, str] | None = None) -> list[int]:
    return [e["offset"] for e in await all_events(client, channel, headers)]


async def list_channels(client, token: str, **params) -> dict:
    resp = await client.get("/api/channels", params={k: str(v) for k, v in params.items()}, headers=bearer(token))
    body = await resp.read()
    assert resp.status == 200, body
    return orjson.loads(body)


async def sse_following(client, channel: str) -> SseClient:
    """An SSE stream on one channel, returned once it is subscribed (its first `id:` has arrived)."""
    sse = await SseClient.connect(client, f"channel={channel}")
    while "id" not in await sse.message():
        pass
    return sse


@pytest.fixture
async def pub(client) -> str:
    return await token_for(client, "pub", ("publisher",))


@pytest.fixture
async def admin(client) -> str:
    return await token_for(client, "root", ("admin",))


@pytest.fixture
async def sub(client) -> str:
    return await token_for(client, "sub", ("subscriber",))


# ---------------------------------------------------------------- publishing


async def test_publish_answers_201_with_the_stored_event(client, pub):
    before = datetime.now(UTC)
    resp = await client.post(
        events_path("orders"), json={"type": "order.created", "data": {"id": 7}}, headers=bearer(pub)
    )
    assert resp.status == 201, await resp.text()
    assert resp.content_type == "application/json"
    event = await resp.json()
    assert set(event) == EVENT_FIELDS
    assert event["channel"] == "orders"
    assert event["offset"] == 1
    assert event["type"] == "order.created"
    assert event["data"] == {"id": 7}
    assert TIME_FORMAT.fullmatch(event["time"]), event["time"]
    published = datetime.strptime(event["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - timedelta(seconds=5) <= published <= datetime.now(UTC) + timedelta(seconds=5)
    assert (await history(client, "orders", bearer(pub)))["items"] == [event]


async def test_type_defaults_to_message_and_data_to_null(client, pub):
    resp = await client.post(events_path("news"), json={"data": 1}, headers=bearer(pub))
    assert resp.status == 201
    assert (await resp.json())["type"] == "message"
    resp = await client.post(events_path("news"), json={}, headers=bearer(pub))
    assert resp.status == 201
    event = await resp.json()
    assert (event["type"], event["data"], event["offset"]) == ("message", None, 2)


DATA_VALUES = [
    {"id": 7, "total": 12.5, "tags": ["a", "b"], "nested": {"deep": [None, True, False]}},
    {},
    [1, "two", 3.25, None, {"k": []}],
    [],
    "a plain string",
    "",
    "nul \u0000 in the middle, and non-ASCII: é ü ß 中文 😀 \u2028",
    "\u0000",
    0,
    -42,
    9007199254740993,
    3.141592653589793,
    -1.5e-300,
    True,
    False,
    None,
]


async def test_data_comes_back_exactly_as_published_in_the_response_and_in_history(client, pub):
    published = []
    for value in DATA_VALUES:
        event = await publish(client, pub, "data", value)
        assert event["data"] == value
        assert type(event["data"]) is type(value)
        published.append(event)
    stored = await all_events(client, "data", bearer(pub))
    assert stored == published
    assert [e["data"] for e in stored] == DATA_VALUES
    assert [type(e["data"]) for e in stored] == [type(v) for v in DATA_VALUES]


async def test_data_with_nul_and_non_ascii_round_trips(client, pub):
    body = '{"type":"t","data":{"s":"a\\u0000b","u":"é中😀"}}'.encode()
    resp = await post_raw(client, "raw", body, bearer(pub) | {"Content-Type": "application/json; charset=utf-8"})
    assert resp.status == 201
    raw = await resp.read()
    assert orjson.loads(raw)["data"] == {"s": "a\x00b", "u": "é中😀"}
    page = await history(client, "raw", bearer(pub))
    assert page["items"][0]["data"] == {"s": "a\x00b", "u": "é中😀"}


async def test_offsets_count_per_channel_independently(client, pub):
    sequence = ["a", "b", "a", "c", "a", "b"]
    got = [(await publish(client, pub, channel))["offset"] for channel in sequence]
    assert got == [1, 1, 2, 1, 3, 2]
    assert await offsets(client, "a", bearer(pub)) == [1, 2, 3]
    assert await offsets(client, "b", bearer(pub)) == [1, 2]
    assert await offsets(client, "c", bearer(pub)) == [1]


async def test_a_channel_name_of_128_allowed_characters_is_accepted(client, pub):
    name = ("Az09_.:@-" * 15)[:128]
    event = await publish(client, pub, name, "x")
    assert event["channel"] == name


@pytest.mark.parametrize(
    "channel",
    ["x" * 129, "a%2Fb", "a%20b", "caf%C3%A9", "a%00b", "a%0Ab", "a%2Bb", "a*b"],
    ids=["129-chars", "slash", "space", "non-ascii", "nul", "newline", "plus", "star"],
)
async def test_a_bad_channel_name_is_422_on_publish_and_history(client, admin, channel):
    resp = await client.post(events_path(channel), json={"data": 1}, headers=bearer(admin))
    await expect_problem(resp, 422, "validation_error", "channel")
    resp = await client.get(events_path(channel), headers=bearer(admin))
    await expect_problem(resp, 422, "validation_error", "channel")


@pytest.mark.parametrize("event_type", ["x" * 65, "a b", "", "é", "a/b", 5, 1.5, True, None, ["a"], {"a": 1}])
async def test_a_bad_type_is_422_naming_type(client, pub, event_type):
    resp = await client.post(events_path("news"), json={"type": event_type, "data": 1}, headers=bearer(pub))
    await expect_problem(resp, 422, "validation_error", "type")
    assert await offsets(client, "news", bearer(pub)) == []


async def test_a_type_of_64_allowed_characters_is_accepted(client, pub):
    event_type = ("Az09_.:-" * 8)[:64]
    assert (await publish(client, pub, "news", type_=event_type))["type"] == event_type


async def test_an_unknown_field_is_422_naming_it(client, pub):
    resp = await client.post(events_path("news"), json={"data": 1, "channel": "other"}, headers=bearer(pub))
    await expect_problem(resp, 422, "validation_error", "channel")
    resp = await client.post(events_path("news"), json={"type": "t", "data": 1, "extra": 2}, headers=bearer(pub))
    await expect_problem(resp, 422, "validation_error", "extra")


@pytest.mark.parametrize("body", [b"[]", b'[{"data": 1}]', b'"data"', b"1", b"true", b"null"])
async def test_a_body_that_is_not_a_json_object_is_422(client, pub, body):
    await expect_problem(await post_raw(client, "news", body, bearer(pub)), 422, "validation_error")


@pytest.mark.parametrize("body", [b"{", b"", b"{'data': 1}", b'{"data": 1} trailing', b'{"data": NaN}', b"\xff\xfe"])
async def test_malformed_json_is_400(client, pub, body):
    await expect_problem(await post_raw(client, "news", body, bearer(pub)), 400, "bad_request")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_a_wrong_content_type_is_415(client, pub, content_type):
    headers = bearer(pub) | ({"Content-Type": content_type} if content_type else {})
    resp = await client.post(events_path("news"), data=b'{"data": 1}', headers=headers)
    await expect_problem(resp, 415, "unsupported_media_type")


def body_of_size(size: int) -> bytes:
    base = b'{"data":""}'
    body = b'{"data":"' + b"x" * (size - len(base)) + b'"}'
    assert len(body) == size
    return body


async def test_body_limit_exactly_accepted_one_byte_more_is_413(aiohttp_client, settings, make_settings):
    client = await aiohttp_client(create_app(make_settings({"limits": {"body_bytes": 1024}})))
    token = await token_for(client, "pub", ("publisher",))
    resp = await post_raw(client, "news", body_of_size(1024), bearer(token))
    assert resp.status == 201, await resp.text()
    await expect_problem(await post_raw(client, "news", body_of_size(1025), bearer(token)), 413, "payload_too_large")

    def chunked(size: int):
        async def body():
            yield body_of_size(size)

        return body()

    headers = {"Content-Type": "application/json", **bearer(token)}
    resp = await client.post(events_path("news"), data=chunked(1024), headers=headers)  # no Content-Length
    assert resp.status == 201, await resp.text()
    resp = await client.post(events_path("news"), data=chunked(1025), headers=headers)
    await expect_problem(resp, 413, "payload_too_large")
    resp = await client.post(events_path("news"), data=chunked(4000), headers=headers)
    await expect_problem(resp, 413, "payload_too_large")
    assert await offsets(client, "news", bearer(token)) == [1, 2]


async def test_default_body_limit_is_64_kib(client, pub):
    resp = await post_raw(client, "news", body_of_size(65536), bearer(pub))
    assert resp.status == 201
    await expect_problem(await post_raw(client, "news", body_of_size(65537), bearer(pub)), 413, "payload_too_large")


async def test_publishing_needs_credentials_and_the_publish_permission(client, pub, sub, admin):
    for channel in ("news", "public:news", "secret:x"):
        resp = await client.post(events_path(channel), json={"data": 1})
        await expect_problem(resp, 401, "unauthorized")
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = await client.post(events_path("news"), json={"data": 1}, headers=bearer("not.a.token"))
    await expect_problem(resp, 401, "unauthorized")
    for channel in ("news", "public:news", "secret:x"):
        resp = await client.post(events_path(channel), json={"data": 1}, headers=bearer(sub))
        await expect_problem(resp, 403, "forbidden")
    await expect_problem(
        await client.post(events_path("secret:x"), json={"data": 1}, headers=bearer(pub)), 403, "forbidden"
    )
    assert (await publish(client, pub, "public:news"))["offset"] == 1
    assert (await publish(client, admin, "secret:x"))["offset"] == 1
    assert (await publish(client, admin, "news"))["offset"] == 1
    assert (await publish(client, admin, "anything:at:all"))["offset"] == 1


# ---------------------------------------------------------------- idempotency


async def test_a_retry_with_the_same_key_returns_the_first_event(client, pub):
    headers = bearer(pub) | {"Idempotency-Key": "order-7-created"}
    body = {"type": "order.created", "data": {"id": 7}}
    first = await client.post(events_path("orders"), json=body, headers=headers)
    assert first.status == 201
    first_event = await first.json()
    for _ in range(2):
        retry = await client.post(events_path("orders"), json=body, headers=headers)
        assert retry.status == 200
        assert await retry.json() == first_event
    assert await all_events(client, "orders", bearer(pub)) == [first_event]
    assert (await publish(client, pub, "orders", "next"))["offset"] == 2


async def test_the_same_key_with_another_body_is_409(client, pub):
    headers = bearer(pub) | {"Idempotency-Key": "k1"}
    resp = await client.post(events_path("orders"), json={"type": "a", "data": 1}, headers=headers)
    assert resp.status == 201
    for body in ({"type": "a", "data": 2}, {"type": "b", "data": 1}, {"type": "a"}):
        resp = await client.post(events_path("orders"), json=body, headers=headers)
        await expect_problem(resp, 409, "conflict")
    resp = await client.post(events_path("orders"), json={"type": "a", "data": 1}, headers=headers)
    assert resp.status == 200
    assert await offsets(client, "orders", bearer(pub)) == [1]


async def test_a_key_is_scoped_to_its_channel(client, pub):
    headers = bearer(pub) | {"Idempotency-Key": "shared"}
    await publish(client, pub, "two", "before")
    one = await client.post(events_path("one"), json={"data": 1}, headers=headers)
    two = await client.post(events_path("two"), json={"data": 2}, headers=headers)
    assert (one.status, two.status) == (201, 201)
    assert ((await one.json())["offset"], (await two.json())["offset"]) == (1, 2)
    assert await offsets(client, "one", bearer(pub)) == [1]
    assert await offsets(client, "two", bearer(pub)) == [1, 2]


@pytest.mark.parametrize("channel_exists", [False, True], ids=["new-channel", "existing-channel"])
async def test_concurrent_duplicates_store_exactly_one_event(client, pub, channel_exists):
    if channel_exists:
        await publish(client, pub, "race", "earlier")
    headers = bearer(pub) | {"Idempotency-Key": "same-for-all"}

    async def attempt():
        resp = await client.post(events_path("race"), json={"type": "t", "data": {"n": 1}}, headers=headers)
        return resp.status, await resp.json()

    results = await asyncio.gather(*(attempt() for _ in range(20)))
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 201, 409}, statuses
    assert statuses.count(201) == 1, statuses
    events = [body for status, body in results if status in (200, 201)]
    assert all(e == events[0] for e in events)
    stored = await all_events(client, "race", bearer(pub))
    assert stored[-1] == events[0]
    assert len(stored) == (2 if channel_exists else 1)


@pytest.mark.parametrize("key", ["k" * 256, "k" * 300, "", "has space", "tab\there"])
async def test_a_malformed_key_is_422(client, pub, key):
    resp = await client.post(events_path("news"), json={"data": 1}, headers=bearer(pub) | {"Idempotency-Key": key})
    await expect_problem(resp, 422, "validation_error", "Idempotency-Key")
    assert await offsets(client, "news", bearer(pub)) == []


async def test_a_key_of_255_visible_characters_is_accepted(client, pub):
    key = "".join(chr(c) for c in range(0x21, 0x7F)) * 3
    key = key[:255]
    resp = await client.post(events_path("news"), json={"data": 1}, headers=bearer(pub) | {"Idempotency-Key": key})
    assert resp.status == 201


# ---------------------------------------------------------------- gapless offsets


async def test_concurrent_publishes_get_gapless_offsets(aiohttp_client, settings, make_settings):
    client = await aiohttp_client(create_app(make_settings(NO_RATE_LIMIT)))
    tokens = [await token_for(client, f"pub{i}", ("publisher",)) for i in range(4)]

    async def one(i: int):
        resp = await client.post(events_path("busy"), json={"data": i}, headers=bearer(tokens[i % len(tokens)]))
        assert resp.status == 201, await resp.text()
        return await resp.json()

    published = await asyncio.gather(*(one(i) for i in range(200)))
    assert sorted(e["offset"] for e in published) == list(range(1, 201))
    by_offset = {e["offset"]: e for e in published}

    stored = await all_events(client, "busy", bearer(tokens[0]), limit=37)
    assert [e["offset"] for e in stored] == list(range(1, 201))
    assert stored == [by_offset[o] for o in range(1, 201)]
    times = [e["time"] for e in stored]
    assert times == sorted(times)  # offsets follow commit order, and so does time

    default_page = await history(client, "busy", bearer(tokens[0]))
    assert [e["offset"] for e in default_page["items"]] == list(range(1, 101))
    assert default_page["next"] == 100
    last_page = await history(client, "busy", bearer(tokens[0]), after=100, limit=1000)
    assert [e["offset"] for e in last_page["items"]] == list(range(101, 201))
    assert last_page["next"] is None


# ---------------------------------------------------------------- history


async def test_history_pages_with_after_and_limit(client, pub):
    for i in range(5):
        await publish(client, pub, "news", i)
    auth = bearer(pub)
    page = await history(client, "news", auth)
    assert [e["data"] for e in page["items"]] == [0, 1, 2, 3, 4]
    assert page["next"] is None
    assert await history(client, "news", auth, limit=2) == {"items": page["items"][:2], "next": 2}
    assert await history(client, "news", auth, after=2, limit=2) == {"items": page["items"][2:4], "next": 4}
    assert await history(client, "news", auth, after=4, limit=2) == {"items": page["items"][4:], "next": None}
    assert await history(client, "news", auth, limit=5) == {"items": page["items"], "next": 5}
    assert await history(client, "news", auth, after=5) == {"items": [], "next": None}
    assert await history(client, "news", auth, after=10**9) == {"items": [], "next": None}
    assert await history(client, "news", auth, after=0, limit=1000) == page
    assert await history(client, "news", auth, after=3, limit=1) == {"items": [page["items"][3]], "next": 4}
    for limit in (1, 2, 3, 5, 6):
        assert await all_events(client, "news", auth, limit=limit) == page["items"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("limit", "0"),
        ("limit", "1001"),
        ("limit", "-1"),
        ("after", "-1"),
        ("after", str(2**62 + 1)),
        ("after", "9" * 5000),
    ],
)
async def test_history_rejects_integers_out_of_range_with_422(client, pub, name, value):
    await publish(client, pub, "news")
    resp = await client.get(events_path("news"), params={name: value}, headers=bearer(pub))
    await expect_problem(resp, 422, "validation_error", name)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("limit", "x"),
        ("limit", "1.5"),
        ("limit", "²"),
        ("limit", "\u0661\u0660"),
        ("limit", "+5"),
        ("limit", " 5"),
        ("limit", "5 "),
        ("limit", "1_0"),
        ("limit", "0x10"),
        ("limit", "\x00"),
        ("after", "abc"),
        ("after", "1e3"),
        ("after", "\u0661"),
        ("after", "-"),
    ],
)
async def test_history_rejects_a_query_value_that_is_not_an_integer_with_400(client, pub, name, value):
    """PROTOCOL §1: a malformed query is 400 `bad_request`; only an integer out of range is 422 (§4)."""
    await publish(client, pub, "news")
    resp = await client.get(events_path("news"), params={name: value}, headers=bearer(pub))
    await expect_problem(resp, 400, "bad_request", name)


async def test_history_of_a_channel_that_never_had_an_event_is_an_empty_page(client, sub):
    resp = await client.get(events_path("public:quiet"))
    assert resp.status == 200
    assert await resp.json() == {"items": [], "next": None}
    assert await history(client, "quiet", bearer(sub), after=3, limit=10) == {"items": [], "next": None}
    assert (await list_channels(client, sub))["items"] == []


async def test_history_needs_the_subscribe_permission(client, pub, sub, admin):
    for channel in ("public:news", "news", "secret:x"):
        await publish(client, admin, channel)
    assert len((await history(client, "public:news"))["items"]) == 1  # anonymous may read public:*
    await expect_problem(await client.get(events_path("news")), 401, "unauthorized")
    assert len((await history(client, "news", bearer(sub)))["items"]) == 1
    await expect_problem(await client.get(events_path("secret:x")), 401, "unauthorized")
    for token in (sub, pub):
        await expect_problem(await client.get(events_path("secret:x"), headers=bearer(token)), 403, "forbidden")
    assert len((await history(client, "secret:x", bearer(admin)))["items"]) == 1
    resp = await client.get(events_path("public:news"), headers=bearer("not.a.token"))
    await expect_problem(resp, 401, "unauthorized")


async def test_a_users_own_channel_is_readable_only_by_its_owner(client, pub, admin):
    me = await client.get("/api/me", headers=bearer(pub))
    own = f"user:{(await me.json())['id']}"
    other = await token_for(client, "other", ("subscriber",))
    await publish(client, pub, own, "private")
    assert len((await history(client, own, bearer(pub)))["items"]) == 1
    assert len((await history(client, own, bearer(admin)))["items"]) == 1
    await expect_problem(await client.get(events_path(own), headers=bearer(other)), 403, "forbidden")
    await expect_problem(await client.get(events_path(own)), 401, "unauthorized")


# ---------------------------------------------------------------- channel list


async def test_listing_channels_needs_authentication(client):
    await expect_problem(await client.get("/api/channels"), 401, "unauthorized")


async def test_the_channel_list_holds_only_followable_channels_with_events(client, admin, sub):
    me = await client.get("/api/me", headers=bearer(sub))
    own = f"user:{(await me.json())['id']}"
    for channel, count in (("public:a", 2), ("news", 1), ("secret:s", 1), (own, 3), ("user:999999", 1)):
        for _ in range(count):
            await publish(client, admin, channel)
    await client.get(events_path("public:never"))  # reading does not create a channel
    await client.post(events_path("refused"), json={"data": 1}, headers=bearer(sub))  # 403 creates nothing

    page = await list_channels(client, sub)
    assert page == {
        "items": [
            {"name": "news", "last_offset": 1, "subscribers": 0},
            {"name": "public:a", "last_offset": 2, "subscribers": 0},
            {"name": own, "last_offset": 3, "subscribers": 0},
        ],
        "next": None,
    }
    names = [c["name"] for c in (await list_channels(client, admin))["items"]]
    assert names == sorted(["news", "public:a", "secret:s", own, "user:999999"])


async def test_the_channel_list_pages_with_after_next(client, pub):
    names = [f"ch{i}" for i in range(5)]
    for offset, name in enumerate(names, start=1):
        for _ in range(offset):
            await publish(client, pub, name)
    await publish(client, pub, "secret-free:x")  # still followable by an authenticated caller
    names.append("secret-free:x")
    seen = []
    after = None
    while True:
        params = {"limit": 2} | ({"after": after} if after is not None else {})
        page = await list_channels(client, pub, **params)
        seen.extend(page["items"])
        if page["next"] is None:
            assert len(page["items"]) < 2
            break
        assert len(page["items"]) == 2
        assert page["next"] == page["items"][-1]["name"]
        after = page["next"]
    assert [c["name"] for c in seen] == sorted(names)
    assert {c["name"]: c["last_offset"] for c in seen if c["name"].startswith("ch")} == {
        f"ch{i}": i + 1 for i in range(5)
    }
    full = await list_channels(client, pub, limit=6)
    assert len(full["items"]) == 6
    assert full["next"] == full["items"][-1]["name"]
    assert await list_channels(client, pub, limit=6, after=full["next"]) == {"items": [], "next": None}
    for bad in ("0", "1001"):
        resp = await client.get("/api/channels", params={"limit": bad}, headers=bearer(pub))
        await expect_problem(resp, 422, "validation_error", "limit")
    for bad in ("x", "+2", "\u0661"):  # not integers at all: a malformed query (PROTOCOL §1)
        resp = await client.get("/api/channels", params={"limit": bad}, headers=bearer(pub))
        await expect_problem(resp, 400, "bad_request", "limit")
    for bad in ("\x00", "ch\x00", "a b", "x" * 129, "é"):  # a NUL reached PostgreSQL: 500
        resp = await client.get("/api/channels", params={"after": bad}, headers=bearer(pub))
        await expect_problem(resp, 422, "validation_error", "after")


async def test_subscribers_count_live_subscriptions_on_both_transports(client, pub, sub):
    await publish(client, pub, "public:live")
    await publish(client, pub, "public:other")

    async def subscribers() -> dict[str, int]:
        page = await list_channels(client, sub)
        return {c["name"]: c["subscribers"] for c in page["items"]}

    assert await subscribers() == {"public:live": 0, "public:other": 0}
    ws = await WsClient.connect(client)
    sse = None
    try:
        await ws.subscribe("public:live")
        sse = await sse_following(client, "public:live")
        await wait_for(lambda: _equals(subscribers(), {"public:live": 2, "public:other": 0}))
    finally:
        await ws.ws.close()
        if sse is not None:
            sse.close()
    await wait_for(lambda: _equals(subscribers(), {"public:live": 0, "public:other": 0}))


async def _equals(value, expected) -> bool:
    return await value == expected


# ---------------------------------------------------------------- large events


async def test_a_large_event_reaches_subscribers_whole_and_in_order(client, pub):
    big = {"blob": "é" * 6000 + "x" * 8000, "list": list(range(500))}
    assert len(orjson.dumps(big)) > 20000
    ws = await WsClient.connect(client)
    sse = await sse_following(client, "public:big")
    try:
        await ws.subscribe("public:big")
        published = [
            await publish(client, pub, "public:big", "before"),
            await publish(client, pub, "public:big", big, type_="large"),
            await publish(client, pub, "public:big", "after"),
        ]
        assert published[1]["data"] == big
        expected = [{"op": "event", **event} for event in published]
        assert await ws.events(3) == expected
        assert await sse.events(3) == expected
    finally:
        await ws.ws.close()
        sse.close()
    assert await all_events(client, "public:big") == published


async def test_events_around_the_notify_size_limit_all_arrive_in_order(client, pub):
    """Events just under and over PostgreSQL's 8000-byte NOTIFY payload limit (multi-byte text included)."""
    ws = await WsClient.connect(client)
    sse = await sse_following(client, "public:edge")
    try:
        await ws.subscribe("public:edge")
        probe = await client.post(events_path("public:edge"), json={"data": "é"}, headers=bearer(pub))
        overhead = len(await probe.read()) - len(orjson.dumps("é"))
        published = [await probe.json()]
        for size in (7899, 7900, 7901, 7999, 8000, 8001, 8100):  # bytes of the event's JSON text
            data = "é" + "x" * (size - overhead - len(orjson.dumps("é")))
            resp = await client.post(events_path("public:edge"), json={"data": data}, headers=bearer(pub))
            assert resp.status == 201
            raw = await resp.read()
            assert len(raw) == size
            published.append(orjson.loads(raw))
        assert [e["offset"] for e in published] == list(range(1, 9))
        expected = [{"op": "event", **event} for event in published]
        assert await ws.events(8) == expected
        assert await sse.events(8) == expected
    finally:
        await ws.ws.close()
        sse.close()


# ---------------------------------------------------------------- retention


async def test_history_is_pruned_to_history_size_and_offsets_keep_counting(aiohttp_client, settings, make_settings):
    client = await aiohttp_client(create_app(make_settings({"events": {"history_size": 5, "prune_interval": 0.2}})))
    token = await token_for(client, "pub", ("publisher",))
    for i in range(12):
        await publish(client, token, "public:kept", i)
    await publish(client, token, "public:short", "only one")

    async def pruned() -> bool:
        return await offsets(client, "public:kept") == [8, 9, 10, 11, 12]

    await wait_for(pruned)
    assert [e["data"] for e in await all_events(client, "public:kept")] == [7, 8, 9, 10, 11]
    assert await offsets(client, "public:short") == [1]
    assert (await publish(client, token, "public:kept", 12))["offset"] == 13
    channels = await list_channels(client, token)
    assert {c["name"]: c["last_offset"] for c in channels["items"]} == {"public:kept": 13, "public:short": 1}
    await wait_for(lambda: _equals(offsets(client, "public:kept"), [9, 10, 11, 12, 13]))


async def test_events_older_than_history_ttl_are_pruned(aiohttp_client, settings, make_settings):
    client = await aiohttp_client(create_app(make_settings({"events": {"history_ttl": 1, "prune_interval": 0.2}})))
    token = await token_for(client, "pub", ("publisher",))
    assert [(await publish(client, token, "public:aging", i))["offset"] for i in range(3)] == [1, 2, 3]
    await wait_for(lambda: _equals(offsets(client, "public:aging"), []))
    assert (await publish(client, token, "public:aging", "fresh"))["offset"] == 4
    assert (await list_channels(client, token))["items"][0]["last_offset"] == 4


async def test_age_pruning_keeps_younger_events(aiohttp_client, settings, make_settings, database_url):
    client = await aiohttp_client(create_app(make_settings({"events": {"history_ttl": 60, "prune_interval": 0.2}})))
    token = await token_for(client, "pub", ("publisher",))
    for i in range(4):
        await publish(client, token, "public:aging", i)
    conn = await db.connect(database_url)
    try:  # offsets 1 and 2 were published two minutes ago, as far as the pruner can tell
        await conn.execute(
            """UPDATE events SET time = time - interval '2 minutes' WHERE channel = 'public:aging' AND "offset" <= 2"""
        )
    finally:
        await conn.close()
    await wait_for(lambda: _equals(offsets(client, "public:aging"), [3, 4]))


# ---------------------------------------------------------------- database outage


async def test_publishing_while_the_database_is_down_is_503_then_works_again(client, pub, postgres):
    await publish(client, pub, "public:outage", 1)
    await publish(client, pub, "public:outage", 2)
    postgres.stop()
    try:
        for headers in (bearer(pub), bearer(pub) | {"Idempotency-Key": "during-outage"}):
            resp = await client.post(events_path("public:outage"), json={"data": "lost"}, headers=headers)
            problem = await expect_problem(resp, 503, "unavailable")
            assert "Traceback" not in problem["detail"]
        await expect_problem(await client.get(events_path("public:outage")), 503, "unavailable")
        await expect_problem(await client.get("/api/channels", headers=bearer(pub)), 503, "unavailable")
    finally:
        postgres.start()

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await wait_for(ready, timeout=20)
    assert (await publish(client, pub, "public:outage", 3))["offset"] == 3
    resp = await client.post(
        events_path("public:outage"), json={"data": 4}, headers=bearer(pub) | {"Idempotency-Key": "during-outage"}
    )
    assert resp.status == 201
    assert (await resp.json())["offset"] == 4
    assert [e["data"] for e in await all_events(client, "public:outage")] == [1, 2, 3, 4]


async def test_integers_of_any_size_are_kept_exactly(client, pub):
    body = b'{"data": {"big": 123456789012345678901234567890, "neg": -98765432109876543210}}'
    resp = await post_raw(client, "big", body, bearer(pub))
    assert resp.status == 201
    text = await resp.text()
    assert '"big":123456789012345678901234567890' in text
    history = await (await client.get(events_path("big") + "?after=0", headers=bearer(pub))).text()
    assert "-98765432109876543210" in history


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"data": NaN}', 400),  # not JSON at all
        (b'{"data": Infinity}', 400),
        (b'{"data": 1E400}', 422),  # JSON, but no finite number holds it
        (b'{"data": "\\ud800"}', 422),  # a lone surrogate is not Unicode text
    ],
)
async def test_numbers_and_strings_that_cannot_be_stored_exactly_are_refused(client, pub, body, status):
    resp = await post_raw(client, "odd", body, bearer(pub))
    assert resp.status == status, await resp.text()


@pytest.mark.parametrize("channel", ["orders", "user:42", "a.b_c-d@e:f", "x" * 128])
async def test_the_broker_reads_a_notifications_head_as_json_would(client, pub, channel):
    """What notification_head reads from both payload shapes agrees with a full JSON parse."""
    data = {"offset": 99, "large": True, "s": '","offset":7,'}
    resp = await client.post(events_path(channel), json={"data": data}, headers=bearer(pub))
    small = await resp.text()  # the stored JSON text: the same bytes a NOTIFY carries
    event = orjson.loads(small)
    large = orjson.dumps({"channel": channel, "offset": event["offset"], "large": True}).decode()
    assert notification_head(small) == (channel, event["offset"], False)
    assert notification_head(large) == (channel, event["offset"], True)
