"""The middleware chain's promises (PROTOCOL §1), through real HTTP against a real app."""

from __future__ import annotations

import io
import logging
import uuid

import orjson
import pytest
from aiohttp import web

from handlers.http import json_response, read_json_object
from server import errors
from server.app import create_app
from server.ops.logs import AccessLog

ERROR_CLASSES = {cls.status: cls for cls in errors.ApiError.__subclasses__()}


def add_test_routes(app: web.Application) -> None:
    async def echo(request):
        return json_response(await read_json_object(request))

    async def raise_status(request):
        cls = ERROR_CLASSES[int(request.match_info["status"])]
        raise cls("test detail", headers={"Retry-After": "3"} if cls.status == 429 else None)

    async def boom(request):
        raise RuntimeError("secret internal detail")

    async def database_down(request):
        raise ConnectionRefusedError("connection to /tmp/.s.PGSQL refused")

    async def stream(request):
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"chunk")
        return response

    app.router.add_post("/t/echo", echo)
    app.router.add_get("/t/raise/{status}", raise_status)
    app.router.add_get("/t/boom", boom)
    app.router.add_get("/t/dbdown", database_down)
    app.router.add_get("/t/stream", stream)


@pytest.fixture
def access_stream() -> io.BytesIO:
    return io.BytesIO()


def lines_of(stream: io.BytesIO) -> list[dict]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture
async def make_client(aiohttp_client, make_settings, settings, access_stream):
    async def make(raw=None):
        app = create_app(make_settings(raw), access_log=AccessLog(access_stream))
        add_test_routes(app)
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def tclient(make_client):
    return await make_client()


def assert_problem(resp, body, status, code):
    assert resp.status == status
    assert resp.content_type == "application/problem+json"
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == "about:blank"
    assert body["title"]
    assert body["request_id"] == resp.headers["X-Request-Id"]


# request_id


@pytest.mark.parametrize("incoming", ["abc", "A.b_c:d-1", "x" * 128])
async def test_a_well_formed_request_id_is_kept(tclient, incoming):
    resp = await tclient.get("/healthz", headers={"X-Request-Id": incoming})
    assert resp.headers["X-Request-Id"] == incoming


@pytest.mark.parametrize("incoming", ["", "x" * 129, "has space", "semi;colon", "ünï"])
async def test_a_malformed_request_id_is_replaced_by_a_uuid(tclient, incoming):
    resp = await tclient.get("/healthz", headers={"X-Request-Id": incoming})
    assert resp.headers["X-Request-Id"] != incoming
    uuid.UUID(resp.headers["X-Request-Id"])


async def test_request_id_is_minted_and_present_on_errors_404_and_streams(tclient):
    for path in ("/healthz", "/nope", "/t/boom", "/t/stream"):
        resp = await tclient.get(path)
        uuid.UUID(resp.headers["X-Request-Id"])
    resp = await tclient.get("/t/stream", headers={"X-Request-Id": "stream-1"})
    assert resp.headers["X-Request-Id"] == "stream-1"
    assert await resp.read() == b"chunk"


async def test_each_request_gets_its_own_id(tclient):
    ids = {(await tclient.get("/healthz")).headers["X-Request-Id"] for _ in range(5)}
    assert len(ids) == 5


# errors


async def test_unknown_route_is_problem_json_not_html(tclient):
    resp = await tclient.get("/api/nope")
    body = await resp.json(content_type=None)
    assert_problem(resp, body, 404, "not_found")
    assert body["detail"] == "No route for GET /api/nope"
    assert "errors" not in body


async def test_wrong_method_is_405_with_allow(tclient):
    resp = await tclient.delete("/healthz")
    body = await resp.json(content_type=None)
    assert_problem(resp, body, 405, "method_not_allowed")
    assert "GET" in resp.headers["Allow"]


async def test_malformed_json_is_400(tclient):
    resp = await tclient.post("/t/echo", data=b"{nope", headers={"Content-Type": "application/json"})
    assert_problem(resp, await resp.json(content_type=None), 400, "bad_request")


async def test_json_that_is_not_an_object_is_422_naming_the_body(tclient):
    resp = await tclient.post("/t/echo", data=b"[1]", headers={"Content-Type": "application/json"})
    body = await resp.json(content_type=None)
    assert_problem(resp, body, 422, "validation_error")
    assert body["errors"][0]["field"] == "body"


async def test_wrong_content_type_is_415(tclient):
    resp = await tclient.post("/t/echo", data=b"{}", headers={"Content-Type": "text/plain"})
    assert_problem(resp, await resp.json(content_type=None), 415, "unsupported_media_type")


async def test_body_of_exactly_the_limit_is_accepted_and_one_more_byte_is_413(make_client):
    client = await make_client({"limits": {"body_bytes": 1000}})
    filler = "x" * (1000 - len('{"a":""}'))
    exact = f'{{"a":"{filler}"}}'.encode()
    assert len(exact) == 1000
    ok = await client.post("/t/echo", data=exact, headers={"Content-Type": "application/json"})
    assert ok.status == 200
    too_big = exact[:-1] + b" }"
    resp = await client.post("/t/echo", data=too_big, headers={"Content-Type": "application/json"})
    assert_problem(resp, await resp.json(content_type=None), 413, "payload_too_large")


async def test_chunked_body_over_the_limit_is_413(make_client):
    client = await make_client({"limits": {"body_bytes": 100}})

    async def chunks():
        for _ in range(10):
            yield b"x" * 50

    resp = await client.post("/t/echo", data=chunks(), headers={"Content-Type": "application/json"})
    assert_problem(resp, await resp.json(content_type=None), 413, "payload_too_large")


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "bad_request"),
        (401, "unauthorized"),
        (403, "forbidden"),
        (404, "not_found"),
        (405, "method_not_allowed"),
        (409, "conflict"),
        (413, "payload_too_large"),
        (415, "unsupported_media_type"),
        (422, "validation_error"),
        (429, "rate_limited"),
        (500, "internal_error"),
        (503, "unavailable"),
    ],
)
async def test_every_error_status_has_its_code(tclient, status, code):
    resp = await tclient.get(f"/t/raise/{status}")
    body = await resp.json(content_type=None)
    assert_problem(resp, body, status, code)
    assert body["detail"] == "test detail"
    if status == 401:
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    if status == 429:
        assert resp.headers["Retry-After"] == "3"


async def test_a_crash_is_a_generic_500_and_the_traceback_is_logged_with_the_request_id(tclient, caplog):
    caplog.set_level(logging.ERROR, logger="herald.errors")
    resp = await tclient.get("/t/boom", headers={"X-Request-Id": "crash-1"})
    text = await resp.text()
    assert_problem(resp, await resp.json(content_type=None), 500, "internal_error")
    assert "secret" not in text
    assert "RuntimeError" not in text
    assert "Traceback" not in text
    [record] = [r for r in caplog.records if r.name == "herald.errors"]
    assert record.exc_info
    assert record.exc_info[0] is RuntimeError
    from server.ops.logs import JsonFormatter

    # The formatter reads the request id from the context; the record carries the traceback.
    assert "secret internal detail" in JsonFormatter().format(record)


async def test_an_unreachable_database_is_503_not_500(tclient):
    resp = await tclient.get("/t/dbdown")
    body = await resp.json(content_type=None)
    assert_problem(resp, body, 503, "unavailable")
    assert "PGSQL" not in body["detail"]


# security headers


async def test_security_headers_on_json_errors_and_streams(tclient):
    for path in ("/healthz", "/nope", "/t/stream"):
        resp = await tclient.get(path)
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert "default-src" in resp.headers["Content-Security-Policy"]
        assert resp.headers["Server"] == "Herald"
        assert "Strict-Transport-Security" not in resp.headers


async def test_hsts_only_when_a_trusted_proxy_says_https(make_client):
    trusted = await make_client({"server": {"trusted_proxies": ["127.0.0.0/8", "::1"]}})
    resp = await trusted.get("/healthz", headers={"X-Forwarded-Proto": "https"})
    assert resp.headers["Strict-Transport-Security"].startswith("max-age=")
    resp = await trusted.get("/healthz", headers={"X-Forwarded-Proto": "http"})
    assert "Strict-Transport-Security" not in resp.headers
    untrusted = await make_client()
    resp = await untrusted.get("/healthz", headers={"X-Forwarded-Proto": "https"})
    assert "Strict-Transport-Security" not in resp.headers


# access log


async def test_one_access_line_per_request_with_its_fields(tclient, access_stream):
    await tclient.get("/healthz", headers={"X-Request-Id": "log-1"})
    await tclient.get("/nope")
    first, second = lines_of(access_stream)
    assert (first["method"], first["route"], first["status"], first["bytes"]) == ("GET", "/healthz", 200, 15)
    assert (first["logger"], first["level"], first["request_id"]) == ("herald.access", "info", "log-1")
    assert first["duration_ms"] >= 0
    assert first["time"].endswith("Z")
    assert (second["status"], second["route"]) == (404, "unmatched")


async def test_access_log_redacts_tokens_in_query_strings(tclient, access_stream):
    await tclient.get("/healthz?access_token=eyJsecret.part.sig&channel=a")
    [line] = lines_of(access_stream)
    assert "eyJsecret" not in line["path"]
    assert "access_token=REDACTED" in line["path"]
    assert "channel=a" in line["path"]


def test_json_formatter_writes_one_json_line_with_the_request_id():
    import orjson

    from server.ops.logs import JsonFormatter, request_id_var

    token = request_id_var.set("rid-7")
    try:
        record = logging.LogRecord("herald.access", logging.INFO, __file__, 1, "request", None, None)
        record.status = 200
        line = JsonFormatter().format(record)
    finally:
        request_id_var.reset(token)
    assert "\n" not in line
    entry = orjson.loads(line)
    assert entry["request_id"] == "rid-7"
    assert entry["status"] == 200
    assert entry["time"].endswith("Z")


# CORS


async def test_cors_allowed_origin_gets_headers_and_exposed_ids(make_client):
    client = await make_client({"cors": {"origins": ["https://app.example"]}})
    resp = await client.get("/healthz", headers={"Origin": "https://app.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    exposed = resp.headers["Access-Control-Expose-Headers"]
    assert "X-Request-Id" in exposed
    assert "RateLimit-Remaining" in exposed


async def test_cors_preflight_is_cached(make_client):
    client = await make_client({"cors": {"origins": ["https://app.example"]}})
    resp = await client.options(
        "/healthz", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"}
    )
    assert resp.status == 200
    assert resp.headers["Access-Control-Max-Age"] == "600"
    assert resp.headers["X-Request-Id"]


async def test_cors_disallowed_origin_gets_no_cors_headers(make_client):
    client = await make_client({"cors": {"origins": ["https://app.example"]}})
    resp = await client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert resp.status == 200
    assert not [h for h in resp.headers if h.lower().startswith("access-control-")]
