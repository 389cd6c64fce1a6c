"""The load generator: pools of subscribers and the publisher."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import orjson

from bench import BenchError
from bench.recorder import BURST, STEADY, Recorder
from bench.servers import Server
from bench.subscribers import TRANSPORTS, HttpStream

CONNECT_CONCURRENCY = 64
BURST_CONCURRENCY = 16
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 15.0
PUBLISH_TIMEOUT = aiohttp.ClientTimeout(total=30)


@asynccontextmanager
async def task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """A TaskGroup that raises its first failure itself rather than inside an ExceptionGroup."""
    try:
        async with asyncio.TaskGroup() as group:
            yield group
    except ExceptionGroup as failures:
        raise failures.exceptions[0] from None


class SubscriberPool:
    """The subscribers of one measurement; all closed on exit."""

    def __init__(self, server: Server, recorder: Recorder) -> None:
        self.server = server
        self.recorder = recorder
        self.subscribers: list[HttpStream] = []

    async def __aenter__(self) -> SubscriberPool:
        return self

    async def __aexit__(self, *_exc_info: object) -> None:
        await self.close()

    async def open(self, transport: str, channel: str, count: int) -> None:
        """Open `count` subscribers to `channel`, CONNECT_CONCURRENCY handshakes at a time."""
        kind = TRANSPORTS[transport]
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def open_one(index: int) -> None:
            async with gate, asyncio.timeout(HANDSHAKE_TIMEOUT):
                self.subscribers.append(await kind.open(self.server, channel, index, self.recorder))

        async with task_group() as group:
            for index in range(len(self.subscribers), len(self.subscribers) + count):
                group.create_task(open_one(index))

    async def close(self) -> None:
        for subscriber in self.subscribers:
            subscriber.close()
        if self.subscribers:
            await asyncio.wait([subscriber.finished for subscriber in self.subscribers], timeout=CLOSE_TIMEOUT)
        for subscriber in self.subscribers:
            subscriber.discard()


class Publisher:
    """Publishes to one channel over REST; each event's data carries its send time and phase."""

    def __init__(self, session: aiohttp.ClientSession, server: Server, channel: str) -> None:
        self.session = session
        self.url = server.url(f"/api/channels/{channel}/events")
        self.headers = {"Content-Type": "application/json", **server.auth_headers()}

    async def publish(self, phase: str, seq: int) -> None:
        body = orjson.dumps({"type": "bench", "data": {"t": time.time_ns(), "seq": seq, "phase": phase}})
        async with self.session.post(self.url, data=body, headers=self.headers, timeout=PUBLISH_TIMEOUT) as response:
            text = await response.text()
            if response.status != 201:
                raise BenchError(f"POST {response.url.path} answered {response.status}: {text[:300]}")

    async def burst(self, count: int) -> None:
        """Publish `count` events as fast as the server takes them, BURST_CONCURRENCY requests in flight."""
        gate = asyncio.Semaphore(BURST_CONCURRENCY)

        async def publish_one(seq: int) -> None:
            async with gate:
                await self.publish(BURST, seq)

        async with task_group() as group:
            for seq in range(count):
                group.create_task(publish_one(seq))

    async def paced(self, rate: float, count: int) -> None:
        """Publish `count` events at a steady `rate` per second, each on schedule whatever the previous did."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with task_group() as group:
            for seq in range(count):
                await asyncio.sleep(max(0.0, start + seq / rate - loop.time()))
                group.create_task(self.publish(STEADY, seq))
