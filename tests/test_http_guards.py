"""HTTP-level guards of issue 11: Expect: 100-continue, parser errors, deadlines, connection caps.

These speak raw HTTP over a socket: what matters is exactly which bytes come back, and when.
"""

from __future__ import annotations

import asyncio

import orjson

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
