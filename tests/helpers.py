"""Shared test helpers: users and tokens, WebSocket and SSE clients that read with deadlines."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import ClientResponse, ClientWebSocketResponse, WSMsgType

from server.keys import tokens_key, users_key

PASSWORD = "correct horse battery"
RECEIVE_TIMEOUT = 10.0


async def add_user(client, username="alice", roles=("subscriber",), password=PASSWORD):
    return await client.app[users_key].create(username, password, tuple(roles))


async def login(client, username="alice", password=PASSWORD):
    return await client.post("/api/auth/login", json={"username": username, "password": password})


async def token_for(client, username: str, roles=("subscriber",)) -> str:
    """A bearer token for a new user (no cookie is kept: requests use the token only)."""
    user = await add_user(client, username, roles)
    return client.app[tokens_key].issue(str(user.id), user.username, user.roles)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def publish(client, token: str, channel: str, data: Any = None, type_: str = "message", **kwargs):
    resp = await client.post(
        f"/api/channels/{channel}/events", json={"type": type_, "data": data}, headers=bearer(token), **kwargs
    )
    assert resp.status in (200, 201), await resp.text()
    return await resp.json()


async def next_events(
    receive: Callable[[float], Awaitable[dict[str, Any]]], count: int, timeout: float
) -> list[dict[str, Any]]:
    """The next `count` event messages, skipping replies, resets and pings."""
    found = []
    while len(found) < count:
        message = await receive(timeout)
        if message["op"] == "event":
            found.append(message)
    return found


class WsClient:
    """A WebSocket client speaking PROTOCOL §5, every read bounded by a deadline."""

    def __init__(self, ws: ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    @classmethod
    async def connect(cls, client, path: str = "/ws", **kwargs) -> WsClient:
        self = cls(await client.ws_connect(path, **kwargs))
        welcome = await self.receive()
        assert welcome["op"] == "welcome", welcome
        self.welcome = welcome
        return self

    async def send(self, op: str, **fields: Any) -> int:
        self.next_id += 1
        await self.ws.send_str(orjson.dumps({"op": op, "id": self.next_id, **fields}).decode())
        return self.next_id

    async def receive(self, timeout: float = RECEIVE_TIMEOUT) -> dict[str, Any]:
        message = await asyncio.wait_for(self.ws.receive(), timeout)
        if message.type != WSMsgType.TEXT:
            raise AssertionError(f"expected a text frame, got {message.type} {message.data!r} {message.extra!r}")
        return orjson.loads(message.data)

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send an op and return its reply (ok, error or pong), skipping events meanwhile."""
        message_id = await self.send(op, **fields)
        while True:
            message = await self.receive()
            if message.get("id") == message_id and message["op"] != "event":
                return message

    async def subscribe(self, channel: str, offset: int | None = None) -> dict[str, Any]:
        fields = {"channel": channel} if offset is None else {"channel": channel, "offset": offset}
        reply = await self.request("subscribe", **fields)
        assert reply["op"] == "ok", reply
        return reply

    async def events(self, count: int, timeout: float = RECEIVE_TIMEOUT) -> list[dict[str, Any]]:
        return await next_events(self.receive, count, timeout)

    async def closed_with(self, timeout: float = RECEIVE_TIMEOUT) -> int | None:
        """Read until the server closes; return the close code."""
        while True:
            message = await asyncio.wait_for(self.ws.receive(), timeout)
            if message.type == WSMsgType.CLOSE:
                # The code the server sent: aiohttp's server drops the TCP connection right
                # after a close started outside the reader task, so the client's own reply
                # may fail, and then ws.close_code says 1006 whatever the server sent.
                return message.data
            if message.type in (WSMsgType.CLOSED, WSMsgType.CLOSING):
                return self.ws.close_code
            if message.type == WSMsgType.ERROR:
                return self.ws.close_code


class SseClient:
    """Reads an SSE stream message by message, every read bounded by a deadline."""

    def __init__(self, response: ClientResponse) -> None:
        self.response = response
        self.last_id: str | None = None

    @classmethod
    async def connect(cls, client, query: str, headers: dict[str, str] | None = None) -> SseClient:
        response = await client.get(f"/sse?{query}", headers=headers or {})
        assert response.status == 200, await response.text()
        return cls(response)

    async def message(self, timeout: float = RECEIVE_TIMEOUT) -> dict[str, str]:
        """The next message's fields (id, data, retry) or a comment under ':'."""
        raw = await asyncio.wait_for(self.response.content.readuntil(b"\n\n"), timeout)
        fields: dict[str, str] = {}
        for line in raw.decode().strip("\n").split("\n"):
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if "id" in fields:
            self.last_id = fields["id"]
        return fields

    async def data(self, timeout: float = RECEIVE_TIMEOUT) -> dict[str, Any]:
        """The next message that carries data, decoded; comments and id-only messages skipped."""
        while True:
            fields = await self.message(timeout)
            if "data" in fields:
                return orjson.loads(fields["data"])

    async def events(self, count: int, timeout: float = RECEIVE_TIMEOUT) -> list[dict[str, Any]]:
        return await next_events(self.data, count, timeout)

    def close(self) -> None:
        self.response.close()
