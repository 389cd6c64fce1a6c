"""HTTP-level guards of issue 11: Expect: 100-continue, parser errors, deadlines, connection caps.

These speak raw HTTP over a socket: what matters is exactly which bytes come back, and when.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from aiohttp.test_utils import TestServer

from server.app import create_app
from server.web.protocol import HeraldRunner
from tests.conftest import wait_for
from tests.helpers import token_for

DEADLINE = 10.0


async def raw_exchange(client, request: bytes, until: bytes = b"\r\n\r\n") -> bytes:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.readuntil(until), DEADLINE)
    finally:
        writer.close()


async def test_an_oversized_body_announced_with_expect_100_continue_gets_413_at_once(make_client):
    client = await make_client({"limits": {"body_bytes": 1000}})
    token = await token_for(client, "pub", ("publisher",))
    head = (
        "POST /api/channels/public:x/events HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head)  # and never the body: a server waiting for it would time out the read
        status_line = await asyncio.wait_for(reader.readline(), DEADLINE)
        assert status_line.startswith(b"HTTP/1.1 413 "), status_line
        headers = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
        assert b"application/problem+json" in headers
    finally:
        writer.close()


async def test_a_body_within_the_limit_still_gets_100_continue(make_client):
    client = await make_client({"limits": {"body_bytes": 1000}})
    token = await token_for(client, "pub", ("publisher",))
    body = orjson.dumps({"data": 1})
    head = (
        "POST /api/channels/public:x/events HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head)
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        status_line = await asyncio.wait_for(reader.readline(), DEADLINE)
        assert status_line.startswith(b"HTTP/1.1 201 "), status_line
    finally:
        writer.close()


class HeraldTestServer(TestServer):
    """The test server with the worker's runner: Herald's connection handling below the app."""

    async def _make_runner(self, **kwargs):
        return HeraldRunner(self.app, **kwargs)


@pytest.fixture
async def guarded(aiohttp_client, make_settings, settings):
    async def make(server: dict | None = None):
        client = await aiohttp_client(HeraldTestServer(create_app(make_settings({"server": server or {}}))))
        return client, client.server.runner.guard

    return make


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes the connection (within the deadline)."""
    return await asyncio.wait_for(reader.read(), DEADLINE)


async def test_a_malformed_request_gets_a_fixed_problem_body_and_one_short_log_line(guarded, caplog):
    client, _ = await guarded()
    caplog.set_level(logging.DEBUG)
    for _ in range(20):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Secret-Echo\x01: yes\r\n\r\n")
        answer = await read_all(reader)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 ")), answer
        assert b"application/problem+json" in head
        assert b"X-Request-Id: " in head
        assert b"X-Content-Type-Options: nosniff" in head
        assert b"aiohttp" not in answer
        assert b"Python" not in answer
        assert b"Secret-Echo" not in answer  # the request's bytes are never echoed
        problem = orjson.loads(body)
        assert (problem["status"], problem["code"]) == (400, "bad_request")
    # (aiohttp.access is the test server's own access log; the worker runs without it.)
    lines = [r for r in caplog.records if r.name.startswith(("aiohttp", "herald")) and r.name != "aiohttp.access"]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # 20 bad requests, one line
    assert lines[0].exc_info is None  # and no traceback
    assert lines[0].levelno == logging.WARNING


async def test_a_request_head_that_never_completes_is_cut_off(guarded):
    client, guard = await guarded({"header_timeout": 0.5, "keepalive_timeout": 300})
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and one more byte never comes
    assert await read_all(reader) == b""
    writer.close()
    await wait_for(lambda: guard.open == 0)


async def test_a_connection_that_sends_nothing_or_idles_is_closed(guarded):
    client, _ = await guarded({"keepalive_timeout": 0.5})
    reader, writer = await asyncio.open_connection(client.host, client.port)
    assert await read_all(reader) == b""  # never sent a byte
    writer.close()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await read_all(reader)  # answered, then idle past the keep-alive: closed
    assert answer.startswith(b"HTTP/1.1 200 ")
    writer.close()


async def open_idle(client, guard, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for n in range(1, count + 1):
        _, writer = await asyncio.open_connection(client.host, client.port)
        writers.append(writer)
        await wait_for(lambda n=n: guard.open == n)  # accepted in this order
    return writers


async def request_on_new_connection(client, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        return await read_all(reader)
    finally:
        writer.close()


async def test_connections_past_the_soft_cap_serve_only_health_checks_and_admins(guarded):
    client, guard = await guarded({"max_connections": 4, "reserved_connections": 2})
    admin = await token_for(client, "root", ("admin",))
    held = await open_idle(client, guard, 2)  # the ordinary places are taken
    answer = await request_on_new_connection(client, b"GET /api/channels HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert b"Connection: close" in answer
    for request in (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /api/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n\r\n".encode(),
    ):
        answer = await request_on_new_connection(client, request)
        assert answer.startswith(b"HTTP/1.1 200 "), answer  # and the connection closed after it
    for writer in held:
        writer.close()


async def test_at_max_connections_a_health_check_still_gets_in(guarded):
    client, guard = await guarded({"max_connections": 4, "reserved_connections": 2})
    held = await open_idle(client, guard, 4)  # every descriptor this worker may use, idle
    answer = await request_on_new_connection(client, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer  # it took the oldest idle reserve place
    assert guard.open <= 4
    for writer in held:
        writer.close()


async def test_a_body_that_trickles_in_gets_408_after_body_timeout(make_client):
    client = await make_client({"server": {"body_timeout": 0.5}})
    token = await token_for(client, "pub", ("publisher",))
    head = (
        "POST /api/channels/public:x/events HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head + b'{"data": ')  # and the other 91 bytes never come
        status_line = await asyncio.wait_for(reader.readline(), DEADLINE)
        assert status_line.startswith(b"HTTP/1.1 408 "), status_line
    finally:
        writer.close()
