"""A retiring worker cuts no request (issue 10): serve_app drained in-process.

Raw HTTP/1.1 on one keep-alive connection shows exactly what the worker does with it. The
worker is told to stop through serve_app's `stop` event (what SIGTERM sets); an in-flight
publish is held by a PostgreSQL row lock the test holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import asyncpg
import orjson

from server.app import create_app
from server.keys import tokens_key
from server.process.worker import serve_app
from server.storage import db
from tests.conftest import wait_for
from tests.helpers import add_user

DEADLINE = 10.0


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), DEADLINE)
    return status, headers, body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: herald\r\n\r\n".encode()


def post(path: str, body: bytes, token: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: herald\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Worker:
    """serve_app on a socket of its own, stopped through its event."""

    def __init__(self, settings) -> None:
        self.app = create_app(settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(serve_app(self.app, self.sock, 5.0, self.ready.set, self.stop))
        await asyncio.wait_for(self.ready.wait(), 30)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def refuses_new_connections(self) -> bool:
        try:
            _, writer = await self.connect()
        except OSError:
            return True
        writer.close()
        return False

    async def retire(self) -> None:
        """What SIGTERM does; returns once the worker no longer accepts connections."""
        self.stop.set()
        await wait_for(self.refuses_new_connections, timeout=DEADLINE, interval=0.01)

    async def finish(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)


async def test_a_request_on_an_idle_keep_alive_connection_of_a_retiring_worker_is_answered(settings):
    worker = Worker(settings)
    await worker.start()
    try:
        reader, writer = await worker.connect()
        writer.write(get("/healthz"))
        status, headers, _ = await read_response(reader)
        assert status == 200
        assert headers.get("connection", "").lower() != "close"
        await worker.retire()
        # The client did not know yet: it sends its next request on the connection it has.
        writer.write(get("/healthz"))
        status, headers, body = await read_response(reader)
        assert (status, orjson.loads(body)) == (200, {"status": "ok"})
        assert headers["connection"].lower() == "close"  # its last response says so
        assert await asyncio.wait_for(reader.read(), DEADLINE) == b""  # and then it closes
        writer.close()
    finally:
        await worker.finish()


async def test_a_request_in_flight_when_the_worker_retires_is_answered_with_connection_close(settings, database_url):
    worker = Worker(settings)
    await worker.start()
    admin = await db.connect(database_url)
    try:
        user = await add_user_on(worker, "pub", ("publisher",))
        token = worker.app[tokens_key].issue(str(user.id), user.username, user.roles)
        reader, writer = await worker.connect()
        writer.write(post("/api/channels/news/events", b'{"data":1}', token))
        assert (await read_response(reader))[0] == 201
        async with admin.transaction():
            await admin.execute("SELECT 1 FROM channels WHERE name = 'news' FOR UPDATE")  # holds the next publish
            writer.write(post("/api/channels/news/events", b'{"data":2}', token))
            await wait_for(lambda: waiting_on_a_lock(admin), timeout=DEADLINE)
            await worker.retire()
        status, headers, body = await read_response(reader)
        assert status == 201, body
        assert orjson.loads(body)["offset"] == 2
        assert headers["connection"].lower() == "close"
        writer.close()
    finally:
        await admin.close()
        await worker.finish()


async def add_user_on(worker: Worker, username: str, roles):
    class Holder:  # tests.helpers.add_user wants a client with .app
        app = worker.app

    return await add_user(Holder, username, roles)


async def waiting_on_a_lock(admin: asyncpg.Connection) -> bool:
    return bool(
        await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
    )


async def test_a_worker_with_no_open_connection_drains_at_once(settings):
    """The grace is only for connections still open: an idle worker does not wait it out."""
    worker = Worker(settings)
    await worker.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await worker.finish()
    assert loop.time() - started < 1.5
    with contextlib.suppress(OSError):
        worker.sock.close()
