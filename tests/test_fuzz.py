"""Property-based fuzzing of every JSON entry point (issue 10, hypothesis).

Generated JSON values (any nesting, any code point including NUL and lone surrogates, huge
numbers, wrong types) and malformed bodies go to the JSON endpoints and to WebSocket ops.
Whatever comes in: no 5xx, every refusal is a PROTOCOL §1 problem document (an `error`
reply on WebSocket), the WebSocket still answers `ping`, and nothing refused is stored.

Hypothesis runs in a worker thread; each example runs on the test's event loop, so the app,
its database and the connections are set up once per test. Examples are derandomized (the
same every run) and bounded, so the suite's time stays predictable.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import WSMsgType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.errors import CODES_BY_STATUS
from server.keys import store_key, users_key
from tests.helpers import WsClient, add_user, bearer, login

EXAMPLES = 150
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
CHANNEL = "fuzz"
PROBLEM_FIELDS = {"type", "title", "status", "detail", "code", "request_id"}
WS_CODES = set(CODES_BY_STATUS.values())

# Any code point, lone surrogates included (hypothesis leaves category Cs out by default).
any_text = st.text(st.characters(exclude_categories=()), max_size=20)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
    | st.sampled_from(["", "\u0000", "\ud800", "a\u0000b", "admin", "publisher", CHANNEL, "message"])
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=12,
)


def as_json(value: Any) -> bytes:
    """ASCII JSON: lone surrogates travel as \\uXXXX escapes, as a hostile client sends them."""
    return json.dumps(value).encode()


nesting = st.integers(min_value=1, max_value=10_000)  # a WebSocket frame holds 64 KiB
malformed = st.one_of(
    st.binary(max_size=64),
    any_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
    nesting.map(lambda d: b"[" * d + b"]" * d),
    nesting.map(lambda d: b'{"a":' * d + b"1" + b"}" * d),
    nesting.map(lambda d: b"[" * d),
    st.integers(min_value=1, max_value=6000).map(lambda n: b'{"data":' + b"9" * n + b"}"),
    st.sampled_from([b"", b"{", b"NaN", b'{"data":NaN}', b'{"data":Infinity}', b'{"data":1e400}', b"\xff\xfe{"]),
)


@dataclass(frozen=True)
class Target:
    """One JSON endpoint: who calls it, and how a generated value becomes its fields."""

    name: str
    path: str
    caller: str | None  # "publisher", "admin" or None (anonymous)
    fields: Callable[[Any], Any]


TARGETS = [
    Target("publish", f"/api/channels/{CHANNEL}/events", "publisher", lambda v: {"type": "t", "data": v}),
    Target("publish fields", f"/api/channels/{CHANNEL}/events", "publisher", lambda v: {"type": v, "data": 1}),
    Target("login", "/api/auth/login", None, lambda v: {"username": v, "password": v}),
    Target("login name", "/api/auth/login", None, lambda v: {"username": v, "password": "correct horse battery"}),
    Target("create user", "/api/users", "admin", lambda v: {"username": v, "password": v, "roles": v}),
    Target("create user name", "/api/users", "admin", lambda v: {"username": v, "password": "long enough 1"}),
    Target("batch publish", "/api/events", "publisher", lambda v: {"events": [{"channel": CHANNEL, "data": v}, v]}),
    Target(
        "batch publish event",
        "/api/events",
        "publisher",
        lambda v: {"events": [{"channel": CHANNEL, "data": 1, "type": v}]},
    ),
    Target("broadcast", "/api/broadcast", "publisher", lambda v: {"channels": [CHANNEL, v], "data": v}),
]

bodies = st.one_of(
    st.tuples(st.just("fields"), json_values),  # the value in the target's fields
    st.tuples(st.just("value"), json_values.map(as_json)),  # the value as the whole body
    st.tuples(st.just("raw"), malformed),
)
http_cases = st.tuples(st.sampled_from(TARGETS), bodies)


def check_problem(status: int, content_type: str, raw: bytes) -> None:
    assert status < 500, raw
    assert content_type == "application/problem+json", raw
    problem = orjson.loads(raw)
    assert set(problem) >= PROBLEM_FIELDS, problem
    assert problem["status"] == status, problem
    assert problem["code"] == CODES_BY_STATUS[status], problem
    assert isinstance(problem["detail"], str), problem
    assert problem["detail"], problem
    if "errors" in problem:
        assert problem["errors"], problem
        assert all(set(e) == {"field", "message"} for e in problem["errors"]), problem


def run_examples(loop: asyncio.AbstractEventLoop, strategy, check) -> Callable[[], None]:
    """A hypothesis test (for a worker thread) running each example on `loop`."""

    @FUZZ_SETTINGS
    @given(strategy)
    def examples(case) -> None:
        asyncio.run_coroutine_threadsafe(check(case), loop).result(timeout=60)

    return examples


async def test_fuzzed_json_bodies_never_get_a_5xx_and_refusals_store_nothing(client):
    await add_user(client, "root", ("admin",))
    await add_user(client, "pub", ("publisher",))
    tokens = {name: (await (await login(client, name)).json())["access_token"] for name in ("root", "pub")}
    tokens["admin"], tokens["publisher"] = tokens.pop("root"), tokens.pop("pub")
    client.session.cookie_jar.clear()  # tokens only: a login's cookie must not make callers admins
    store, users = client.app[store_key], client.app[users_key]

    async def check(case) -> None:
        target, (kind, value) = case
        body = as_json(target.fields(value)) if kind == "fields" else value
        headers = {"Content-Type": "application/json"}
        if target.caller:
            headers |= bearer(tokens[target.caller])
        events_before = (await store.state(CHANNEL)).last_offset
        users_before = await users.count()
        resp = await client.post(target.path, data=body, headers=headers)
        raw = await resp.read()
        client.session.cookie_jar.clear()
        if resp.status >= 400:
            check_problem(resp.status, resp.content_type, raw)
            assert (await store.state(CHANNEL)).last_offset == events_before
            assert await users.count() == users_before
        else:
            assert resp.status in (200, 201), raw
            assert resp.content_type == "application/json"
            json.loads(raw)  # not orjson: data keeps integers of any size

    await asyncio.to_thread(run_examples(asyncio.get_running_loop(), http_cases, check))


OPS = ["ping", "auth", "subscribe", "unsubscribe", "publish", "nope", None]
ws_messages = st.one_of(
    st.fixed_dictionaries(
        {"op": st.sampled_from(OPS) | json_values},
        optional={
            "id": json_values,
            "channel": st.just(CHANNEL) | json_values,
            "offset": json_values,
            "type": json_values,
            "data": json_values,
            "token": json_values,
        },
    ).map(lambda m: json.dumps(m)),
    json_values.map(json.dumps),
    malformed.map(lambda b: b.decode("utf-8", "replace")),
)


async def test_fuzzed_websocket_ops_get_replies_and_the_connection_keeps_answering_ping(client):
    await add_user(client, "pub", ("publisher",))
    token = (await (await login(client, "pub")).json())["access_token"]
    client.session.cookie_jar.clear()
    ws = await WsClient.connect(client, headers=bearer(token))
    store = client.app[store_key]
    pings = iter(range(10**9))

    async def check(text: str) -> None:
        before = (await store.state(CHANNEL)).last_offset
        await ws.ws.send_str(text)
        ping_id = f"fuzz-ping-{next(pings)}"
        await ws.ws.send_str(orjson.dumps({"op": "ping", "id": ping_id}).decode())
        replies = []
        while True:
            frame = await asyncio.wait_for(ws.ws.receive(), 10)
            assert frame.type == WSMsgType.TEXT, frame
            message = json.loads(frame.data)  # not orjson: events keep integers of any size
            assert isinstance(message, dict), message
            assert message.get("op") in ("ok", "error", "pong", "event"), message
            if message == {"op": "pong", "id": ping_id}:
                break
            if message["op"] != "event":
                replies.append(message)
        assert len(replies) <= 1, replies
        for reply in replies:
            if reply["op"] == "error":
                assert reply["code"] in WS_CODES, reply
                assert reply["code"] != "internal_error", reply
                assert isinstance(reply["message"], str), reply
        published = any(r["op"] == "ok" and "event" in r for r in replies)
        assert (await store.state(CHANNEL)).last_offset == before + (1 if published else 0)

    try:
        await asyncio.to_thread(run_examples(asyncio.get_running_loop(), ws_messages, check))
        assert not ws.ws.closed
    finally:
        await ws.ws.close()
