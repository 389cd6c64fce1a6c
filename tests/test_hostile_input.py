"""Hostile input gets a well-formed refusal (issue 10): deep nesting, text PostgreSQL cannot
store, CORS on the router's own errors, and the WebSocket fine print of PROTOCOL §10 §5."""

from __future__ import annotations

import orjson
import pytest

from server.keys import store_key
from tests.helpers import WsClient, add_user, bearer, login, token_for

DEEP = 30_000  # far past any recursion limit, and within the 64 KiB body limit


async def problem(resp, status: int, code: str) -> dict:
    body = await resp.read()
    assert resp.status == status, body
    assert resp.content_type == "application/problem+json"
    document = orjson.loads(body)
    assert document["code"] == code, document
    return document


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


async def stored_count(client, channel: str) -> int:
    return len(await client.app[store_key].history(channel, 0, 1000))


# deep nesting


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/channels/news/events", '{"data":' + nested(DEEP) + "}"),
        ("/api/channels/news/events", "{" * DEEP),
        ("/api/auth/login", '{"username":' + nested(DEEP) + ',"password":"x"}'),
        ("/api/users", '{"username":"bob","password":"long enough 1","roles":' + nested(DEEP) + "}"),
    ],
)
async def test_deep_nesting_in_any_json_body_is_400_not_500(client, path, body):
    await add_user(client, "root", ("admin", "publisher"))
    token = (await (await login(client, "root")).json())["access_token"]
    assert len(body) <= 65536
    resp = await client.post(path, data=body, headers={**bearer(token), "Content-Type": "application/json"})
    document = await problem(resp, 400, "bad_request")
    assert "nested deeper than 64 levels" in document["detail"]
    assert await stored_count(client, "news") == 0


async def test_nesting_up_to_json_depth_is_accepted_and_one_more_is_refused(make_client):
    client = await make_client({"limits": {"json_depth": 8}})
    pub = await token_for(client, "pub", ("publisher",))
    # The body object is one level; data nested 7 deep makes 8.
    resp = await client.post(
        "/api/channels/news/events",
        data='{"data":' + nested(7) + "}",
        headers={**bearer(pub), "Content-Type": "application/json"},
    )
    assert resp.status == 201, await resp.text()
    resp = await client.post(
        "/api/channels/news/events",
        data='{"data":' + nested(8) + "}",
        headers={**bearer(pub), "Content-Type": "application/json"},
    )
    await problem(resp, 400, "bad_request")
    # Brackets inside strings are text, not nesting.
    resp = await client.post(
        "/api/channels/news/events", json={"data": "[" * 100 + '"\\' + "{" * 100}, headers=bearer(pub)
    )
    assert resp.status == 201, await resp.text()
    assert await stored_count(client, "news") == 2


async def test_deep_nesting_on_a_websocket_is_an_error_reply_and_the_connection_stays(client):
    ws = await WsClient.connect(client)
    await ws.ws.send_str('{"op":"ping","id":1,"x":' + nested(DEEP) + "}")
    reply = await ws.receive()
    assert (reply["op"], reply["code"]) == ("error", "bad_request"), reply
    assert (await ws.request("ping"))["op"] == "pong"


# text PostgreSQL cannot store


@pytest.mark.parametrize(
    "credentials",
    [
        {"username": "ali\u0000ce", "password": "correct horse battery"},
        {"username": "alice", "password": "correct\u0000horse"},
        {"username": "\ud800", "password": "correct horse battery"},
        {"username": "alice", "password": "\udfff lone surrogate"},
    ],
)
async def test_login_with_text_postgresql_cannot_store_is_401(client, credentials):
    await add_user(client, "alice")
    resp = await client.post("/api/auth/login", json=credentials)
    await problem(resp, 401, "unauthorized")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "bo\u0000b", "password": "long enough 1"}, "username"),
        ({"username": "bob", "password": "long\u0000enough 1"}, "password"),
        ({"username": "bob", "password": "long enough \ud800"}, "password"),
        ({"username": "\udc00bob", "password": "long enough 1"}, "username"),
        ({"username": "bob", "password": "long enough 1", "roles": ["a\u0000"]}, "roles"),
    ],
)
async def test_creating_a_user_with_text_postgresql_cannot_store_is_422(client, body, field):
    await add_user(client, "root", ("admin",))
    token = (await (await login(client, "root")).json())["access_token"]
    resp = await client.post("/api/users", json=body, headers=bearer(token))
    document = await problem(resp, 422, "validation_error")
    assert field in [e["field"] for e in document["errors"]]


# CORS on the router's own errors


async def test_router_404_and_405_to_an_allowed_origin_carry_cors_headers(make_client):
    client = await make_client({"cors": {"origins": ["https://app.example"]}})
    origin = {"Origin": "https://app.example"}
    for resp in (await client.get("/api/nope", headers=origin), await client.put("/healthz", headers=origin)):
        assert resp.status in (404, 405)
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
        assert "X-Request-Id" in resp.headers["Access-Control-Expose-Headers"]
        assert "Origin" in resp.headers.getall("Vary")
        assert resp.content_type == "application/problem+json"
    assert "GET" in resp.headers["Allow"]
    # Matched routes keep aiohttp-cors's answer, once.
    resp = await client.get("/api/me", headers=origin)
    assert resp.status == 401
    assert resp.headers.getall("Access-Control-Allow-Origin") == ["https://app.example"]


async def test_router_errors_to_a_disallowed_origin_carry_no_cors_headers(make_client):
    client = await make_client({"cors": {"origins": ["https://app.example"]}})
    resp = await client.get("/api/nope", headers={"Origin": "https://evil.example"})
    assert resp.status == 404
    assert not [h for h in resp.headers if h.lower().startswith("access-control-")]


# WebSocket fine print


async def test_unsubscribe_validates_the_channel_name_like_subscribe(client):
    ws = await WsClient.connect(client)
    for channel in ("bad name", "", "x" * 129, "a\u0000b", 7, None):
        reply = await ws.request("unsubscribe", channel=channel)
        assert (reply["op"], reply["code"]) == ("error", "validation_error"), reply
        subscribe = await ws.request("subscribe", channel=channel)
        assert subscribe["code"] == reply["code"]
    assert (await ws.request("unsubscribe", channel="public:never"))["op"] == "ok"


async def test_a_frame_of_exactly_max_frame_bytes_is_accepted(make_client):
    client = await make_client({"realtime": {"max_frame_bytes": 1024}})
    ws = await WsClient.connect(client)
    head = orjson.dumps({"op": "ping", "id": ""}).decode()
    exact = orjson.dumps({"op": "ping", "id": "x" * (1024 - len(head))}).decode()
    assert len(exact.encode()) == 1024
    await ws.ws.send_str(exact)
    assert (await ws.receive())["op"] == "pong"
    await ws.ws.send_str(orjson.dumps({"op": "ping", "id": "x" * (1025 - len(head))}).decode())
    assert await ws.closed_with() == 1009


async def test_a_websocket_publish_larger_than_body_bytes_is_payload_too_large(make_client):
    client = await make_client({"limits": {"body_bytes": 2048}, "realtime": {"max_frame_bytes": 65536}})
    pub = await token_for(client, "pub", ("publisher",))
    ws = await WsClient.connect(client, headers=bearer(pub))
    # As a REST body, {"type":"t","data":"…"} of exactly 2048 bytes is accepted: so here too.
    exact = 2048 - len(orjson.dumps({"type": "t", "data": ""}))
    reply = await ws.request("publish", channel="news", type="t", data="é" * (exact // 2))
    assert reply["op"] == "ok", reply
    resp = await client.post(
        "/api/channels/news/events",
        data=orjson.dumps({"type": "t", "data": "é" * (exact // 2)}),
        headers={**bearer(pub), "Content-Type": "application/json"},
    )
    assert resp.status == 201  # the same event over REST: the same verdict
    reply = await ws.request("publish", channel="news", type="t", data="é" * (exact // 2) + "x" * 2)
    assert (reply["op"], reply["code"]) == ("error", "payload_too_large"), reply
    assert await stored_count(client, "news") == 2
    assert (await ws.request("ping"))["op"] == "pong"


@pytest.mark.parametrize("raw_id", [str(2**64), str(-(2**63) - 1), '"\\ud800"', "1" + "0" * 400])
async def test_a_websocket_id_that_cannot_be_echoed_is_an_error_reply(client, raw_id):
    """Found by the fuzz test: the reply's id made orjson raise, and the connection died."""
    ws = await WsClient.connect(client)
    await ws.ws.send_str('{"op":"ping","id":' + raw_id + "}")
    reply = await ws.receive()
    assert (reply["op"], reply["code"], reply["id"]) == ("error", "bad_request", None), reply
    assert (await ws.request("ping"))["op"] == "pong"
