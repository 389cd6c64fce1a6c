"""Faults against real `run.py serve` process trees: killed workers, SIGHUP, SIGTERM, shared limits.

Every test starts its own supervisor (in its own session, SIGKILLed with all its workers
at the end) on a free port against the session's test database, and talks to it over
real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import truncate_all, wait_for
from tests.procs import CHANNEL_RULES, Herald, bearer, history, make_users

pytestmark = pytest.mark.slow

CHANNEL = "orders"
NETWORK_ERRORS = (aiohttp.ClientError, ConnectionError, TimeoutError, asyncio.IncompleteReadError)

Launch = Callable[..., Awaitable[Herald]]


@pytest.fixture
async def launch(database_url, tmp_path) -> AsyncIterator[Launch]:
    """start(workers=2, ...) -> a ready Herald; every one started is SIGKILLed (tree) afterwards."""
    await truncate_all(database_url)
    started: list[Herald] = []

    async def start(workers: int = 2, **options: Any) -> Herald:
        herald = Herald.start(tmp_path, database_url, workers=workers, **options)
        started.append(herald)
        await herald.wait_ready()
        return herald

    try:
        yield start
    finally:
        for herald in started:
            herald.kill()
        for herald in started:  # shown by pytest when the test failed
            print(f"--- {herald.log_path.name}, last lines ---\n{herald.log_tail()}")


def fresh_connections(**timeouts: float) -> aiohttp.ClientSession:
    """A client whose every request opens its own TCP connection (so the kernel picks a worker)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(**({"total": 10} | timeouts)),
    )


def parse_sse(raw: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in raw.decode().strip("\n").split("\n"):
        name, _, value = line.partition(":")
        fields[name] = value[1:] if value.startswith(" ") else value
    return fields


async def first_done(tasks: list[asyncio.Task[Any]]) -> None:
    """Fail at once if a background task ended (its exception says why)."""
    for task in tasks:
        if task.done():
            task.result()
            raise AssertionError(f"{task.get_name()} ended early")


# --- kill -9 a worker under live traffic ----------------------------------------------


class Subscriber:
    """Follows CHANNEL over WebSocket or SSE; on any drop reconnects and resumes from what it saw."""

    def __init__(self, herald: Herald, session: aiohttp.ClientSession, kind: str, name: str) -> None:
        self.herald = herald
        self.session = session
        self.kind = kind
        self.name = name
        self.seen: list[int] = []
        self.cursor: str | None = None  # SSE: the last id: line
        self.client_port: int | None = None  # of the current connection, once subscribed
        self.connections = 0
        self.drops: list[str] = []
        self._current: aiohttp.ClientWebSocketResponse | aiohttp.ClientResponse | None = None
        self._closing: set[asyncio.Task[Any]] = set()

    async def run(self) -> None:
        while True:
            try:
                await (self.follow_ws() if self.kind == "ws" else self.follow_sse())
                self.drops.append("closed")
            except NETWORK_ERRORS as exc:
                self.drops.append(repr(exc))
            self.client_port = None
            self._current = None
            await asyncio.sleep(0.05)  # paces reconnect attempts while a worker is gone

    def reconnect(self) -> None:
        """Drop the current connection; run() then opens a new one."""
        self.client_port = None
        if isinstance(self._current, aiohttp.ClientResponse):
            self._current.close()
        elif self._current is not None:
            task = asyncio.create_task(self._current.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def follow_ws(self) -> None:
        async with self.session.ws_connect(self.herald.url("/ws"), autoclose=True) as ws:
            self._current = ws
            message = await ws.receive_json(timeout=10)
            assert message["op"] == "welcome", message
            resume = self.seen[-1] if self.seen else 0
            await ws.send_json({"op": "subscribe", "id": "sub", "channel": CHANNEL, "offset": resume})
            self.connections += 1
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    return
                data = orjson.loads(message.data)
                if data["op"] == "event":
                    self.seen.append(data["offset"])
                elif data["op"] == "ok" and data.get("id") == "sub":
                    assert data["recovered"] is True, data
                    self.client_port = ws.get_extra_info("sockname")[1]
                else:
                    raise AssertionError(f"{self.name}: unexpected {data}")

    async def follow_sse(self) -> None:
        headers = {"Last-Event-ID": self.cursor} if self.cursor else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=5)  # pings come every 0.5 s
        async with self.session.get(self.herald.url(f"/sse?channel={CHANNEL}"), headers=headers, timeout=timeout) as r:
            assert r.status == 200, await r.text()
            self._current = r
            assert r.connection is not None
            port = r.connection.transport.get_extra_info("sockname")[1]
            self.connections += 1
            while True:
                raw = await r.content.readuntil(b"\n\n")
                if not raw.endswith(b"\n\n"):
                    return  # the stream ended
                fields = parse_sse(raw)
                if "id" in fields:
                    self.cursor = fields["id"]
                if "data" in fields:
                    data = orjson.loads(fields["data"])
                    assert data["op"] == "event", f"{self.name}: unexpected {data}"
                    self.seen.append(data["offset"])
                elif "id" in fields:  # the position message that follows the subscription
                    self.client_port = port


async def publish_paced(
    session: aiohttp.ClientSession,
    herald: Herald,
    token: str,
    count: int,
    per_second: float,
    progress: list[int],
    retries: list[str],
) -> dict[int, int]:
    """Publish `count` events at a steady pace; each is retried until the server answers.

    Retries carry the same Idempotency-Key, so an event whose first attempt was stored
    (and whose answer was lost with the worker) is not stored twice.
    """
    offsets: dict[int, int] = {}
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(count):
        if (delay := start + i / per_second - loop.time()) > 0:
            await asyncio.sleep(delay)
        deadline = time.monotonic() + 15
        while i not in offsets:
            headers = {**bearer(token), "Idempotency-Key": f"tick-{i}"}
            try:
                async with session.post(
                    herald.url(f"/api/channels/{CHANNEL}/events"), json={"type": "tick", "data": i}, headers=headers
                ) as resp:
                    body = await resp.read()
                    if resp.status in (200, 201):
                        event = orjson.loads(body)
                        assert event["data"] == i, event
                        offsets[i] = event["offset"]
                        break
                    # 409: a retry met its first attempt still in flight on the killed worker.
                    assert resp.status in (409, 503), (resp.status, body)
                    retries.append(f"{i}: {resp.status}")
            except NETWORK_ERRORS as exc:
                retries.append(f"{i}: {exc!r}")
            assert time.monotonic() < deadline, f"event {i} not published within 15 s"
            await asyncio.sleep(0.05)
        progress.append(i)
    return offsets


async def spread_over_workers(herald: Herald, subscribers: list[Subscriber], tasks: list[asyncio.Task[Any]]) -> int:
    """Reconnect subscribers until one worker holds a WS and an SSE client and the other some client.

    Returns the first worker's pid: the one to kill.
    """

    async def placement() -> dict[int, set[str]] | None:
        await first_done(tasks)
        if any(s.client_port is None for s in subscribers):
            return None
        held: dict[int, set[str]] = {pid: set() for pid in herald.worker_pids()}
        for s in subscribers:
            pid = herald.worker_holding(s.client_port)  # type: ignore[arg-type]
            if pid is None:
                return None
            held.setdefault(pid, set()).add(s.kind)
        return held

    deadline = time.monotonic() + 20
    attempt = 0
    while True:
        held = await wait_for(placement, timeout=10)
        victims = [pid for pid, kinds in held.items() if kinds == {"ws", "sse"}]
        for victim in victims:
            if all(kinds for pid, kinds in held.items() if pid != victim) and len(held) == 2:
                return victim
        assert time.monotonic() < deadline, f"subscribers never spread over both workers: {held}"
        subscribers[attempt % len(subscribers)].reconnect()
        attempt += 1


async def test_a_worker_killed_under_traffic_is_replaced_and_every_subscriber_resumes_without_gaps(launch):
    herald = await launch(workers=2)
    tokens = await make_users(herald.base)
    events = 200
    tasks: list[asyncio.Task[Any]] = []
    async with fresh_connections(total=None) as subscribe_session, fresh_connections() as publish_session:
        try:
            subscribers = [Subscriber(herald, subscribe_session, "ws", f"ws{n}") for n in range(4)]
            subscribers += [Subscriber(herald, subscribe_session, "sse", f"sse{n}") for n in range(2)]
            tasks += [asyncio.create_task(s.run(), name=s.name) for s in subscribers]
            victim = await spread_over_workers(herald, subscribers, tasks)
            on_victim = [s for s in subscribers if herald.worker_holding(s.client_port) == victim]  # type: ignore[arg-type]
            before = {s.name: s.connections for s in subscribers}
            survivor_pids = herald.worker_pids() - {victim}

            progress: list[int] = []
            retries: list[str] = []
            publisher = asyncio.create_task(
                publish_paced(publish_session, herald, tokens.publisher, events, 100, progress, retries),
                name="publisher",
            )
            published_from = time.monotonic()
            tasks.append(publisher)

            async def halfway() -> bool:
                await first_done(tasks)
                return len(progress) >= events // 2

            await wait_for(halfway, timeout=20)

            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            replacement = await wait_for(lambda: herald.worker_pids() - survivor_pids - {victim}, timeout=5)
            replaced_in = time.monotonic() - killed_at
            assert len(replacement) == 1, replacement
            assert victim not in herald.worker_pids()

            offsets = await asyncio.wait_for(publisher, timeout=30)
            publishing = time.monotonic() - published_from
            async with aiohttp.ClientSession() as session:
                stored = await history(session, herald.base, CHANNEL)
            held = [e["offset"] for e in stored]
            last = len(held)
            assert held == list(range(1, last + 1))
            # Idempotent retries: each event stored exactly once, at the offset its publisher was told.
            assert last == events, f"{last} stored for {events} published"
            assert sorted(offsets.values()) == held
            assert {e["offset"]: e["data"] for e in stored} == {o: i for i, o in offsets.items()}

            async def caught_up() -> bool:
                await first_done(tasks[:-1])
                return all(s.seen and s.seen[-1] >= last for s in subscribers)

            await wait_for(caught_up, timeout=20)
            for s in subscribers:
                assert s.seen == held, f"{s.name} saw {s.seen}"
            for s in on_victim:  # the kill did cut them, and they came back
                assert s.connections > before[s.name], (s.name, s.drops)
            print(f"replacement after {replaced_in:.2f}s; on the killed worker: {[s.name for s in on_victim]}")
            print(f"drops: {[(s.name, s.drops) for s in subscribers]}")
            print(f"{events} published in {publishing:.2f}s; retried: {retries}")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


# --- SIGHUP: workers replaced one by one, the port never stops answering ---------------


async def test_sighup_replaces_every_worker_without_failing_a_request(launch):
    herald = await launch(workers=2)
    tokens = await make_users(herald.base)
    old = herald.worker_pids()
    statuses: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []
    duration, hup_at = 6.0, 1.5

    async with fresh_connections(total=5) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def load(path: str, headers: dict[str, str]) -> None:
            while loop.time() - start < duration:
                try:
                    async with session.get(herald.url(path), headers=headers) as resp:
                        await resp.read()
                        statuses[path, resp.status] += 1
                        if resp.status != 200:
                            failures.append(f"{path}: {resp.status}")
                except NETWORK_ERRORS as exc:
                    failures.append(f"{path}: {exc!r}")
                await asyncio.sleep(0.01)

        async def hangup() -> None:
            await asyncio.sleep(hup_at)
            herald.signal(signal.SIGHUP)

        loads = [load("/api/me", bearer(tokens.publisher)) for _ in range(2)]
        loads += [load("/healthz", {}) for _ in range(2)]
        await asyncio.gather(hangup(), *loads)

    print(f"answered: {statuses}")
    assert not failures, f"{len(failures)} failed: {failures[:10]}; answered: {statuses}"
    assert statuses["/api/me", 200] > 50
    assert statuses["/healthz", 200] > 50
    herald.check_running()
    await wait_for(lambda: len(new := herald.worker_pids()) == 2 and new.isdisjoint(old), timeout=15)


async def holds(condition: Callable[[], bool], duration: float, state: Callable[[], object]) -> None:
    """condition() stays true for `duration` seconds (polled); else fail showing state()."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert condition(), state()
        await asyncio.sleep(0.05)


async def test_workers_dying_during_a_sighup_roll_are_replaced_once(launch):
    herald = await launch(workers=2)
    old = herald.worker_pids()
    herald.signal(signal.SIGHUP)
    # The roll has begun once its first new worker exists; the old workers die while it starts.
    await wait_for(lambda: herald.worker_pids() - old, timeout=5, interval=0.005)
    for pid in old:
        os.kill(pid, signal.SIGKILL)

    await wait_for(lambda: len(new := herald.worker_pids()) == 2 and new.isdisjoint(old), timeout=15)
    # A worker the roll had yet to reach was replaced by the restart, not a second time by the roll.
    await holds(lambda: len(herald.worker_pids()) == 2, 1.5, state=herald.worker_pids)
    herald.check_running()
    await herald.wait_ready()


# --- SIGTERM: WebSockets get 1001, SSE streams end, exit 0 -----------------------------


async def test_sigterm_closes_websockets_with_1001_ends_sse_streams_and_exits_0(launch):
    herald = await launch(workers=2)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=10)) as session:
        ws = await session.ws_connect(herald.url("/ws"), autoclose=False)
        assert (await ws.receive_json(timeout=10))["op"] == "welcome"
        await ws.send_json({"op": "subscribe", "id": 1, "channel": CHANNEL})
        reply = await ws.receive_json(timeout=10)
        assert reply["op"] == "ok", reply
        sse = await session.get(herald.url(f"/sse?channel={CHANNEL}"))
        assert sse.status == 200
        while "id" not in parse_sse(await asyncio.wait_for(sse.content.readuntil(b"\n\n"), 10)):
            pass  # up to the position message: the stream is subscribed

        workers = herald.worker_pids()
        herald.signal(signal.SIGTERM)
        signalled = time.monotonic()

        message = await ws.receive(timeout=10)
        while message.type == aiohttp.WSMsgType.TEXT:  # an event or a late reply: not expected, not harmful
            message = await ws.receive(timeout=10)
        assert message.type == aiohttp.WSMsgType.CLOSE, message
        assert ws.close_code == 1001, (message, ws.close_code)
        await ws.close()

        rest = await asyncio.wait_for(sse.content.read(), 10)  # to a clean end of the chunked body
        assert sse.content.at_eof()
        assert all(parse_sse(chunk).keys() <= {""} for chunk in rest.split(b"\n\n") if chunk), rest  # pings only
        sse.release()

    code = await herald.wait_exit(timeout=5 + 3 - (time.monotonic() - signalled))
    assert code == 0, herald.log_tail()
    assert not [pid for pid in workers if psutil.pid_exists(pid)]


# --- one rate limit for the whole server -----------------------------------------------


async def test_the_rate_limit_holds_across_workers(launch):
    rate, burst, attempts = 1, 20, 120
    herald = await launch(workers=2, limits={"rate": rate, "burst": burst})
    tokens = await make_users(herald.base)
    assert len(herald.worker_pids()) == 2

    async with fresh_connections(total=10) as session:

        async def me(delay: float) -> int:
            await asyncio.sleep(delay)
            async with session.get(herald.url("/api/me"), headers=bearer(tokens.publisher)) as resp:
                await resp.read()
                return resp.status

        start = time.monotonic()
        statuses = await asyncio.gather(*(me(n * 0.015) for n in range(attempts)))
        elapsed = time.monotonic() - start

    admitted = statuses.count(200)
    assert statuses.count(429) == attempts - admitted, Counter(statuses)
    assert 0 < admitted <= burst + rate * elapsed + 2, (admitted, elapsed)
    served_by = Counter(e.get("worker") for e in herald.log_entries() if e.get("route") == "/api/me")
    print(f"admitted {admitted} of {attempts} in {elapsed:.2f}s; /api/me answered per worker: {served_by}")
    assert len(served_by) == 2, served_by  # both workers answered, and took from the same bucket


# --- metrics summed over the workers ---------------------------------------------------


def sample_sum(text: str, sample: str, **labels: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and labels.items() <= s.labels.items()
    )


async def test_metrics_add_up_over_the_workers(launch):
    herald = await launch(workers=2)
    tokens = await make_users(herald.base)
    async with fresh_connections() as session:
        for _ in range(40):
            async with session.get(herald.url("/healthz")) as resp:
                assert resp.status == 200
        async with session.get(herald.url("/metrics"), headers=bearer(tokens.admin)) as resp:
            assert resp.status == 200, await resp.text()
            text = await resp.text()
    served = sample_sum(text, "herald_http_requests_total", route="/healthz", status="200")
    assert served >= 40, text
    served_by = Counter(e.get("worker") for e in herald.log_entries() if e.get("route") == "/healthz")
    print(f"/healthz answered per worker: {served_by}")
    assert len(served_by) == 2, served_by  # so the sum really is over both


async def scrape(herald: Herald, token: str) -> str:
    async with fresh_connections() as session, session.get(herald.url("/metrics"), headers=bearer(token)) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.text()


async def publish_one(session: aiohttp.ClientSession, herald: Herald, token: str, n: int) -> None:
    url = herald.url(f"/api/channels/{CHANNEL}/events")
    async with session.post(url, json={"data": n}, headers=bearer(token)) as resp:
        assert resp.status == 201, await resp.text()


async def replaced(herald: Herald, old: set[int]) -> None:
    """Every worker in `old` is gone and as many fresh ones answer /readyz."""
    await wait_for(lambda: not (herald.worker_pids() & old), timeout=60)
    await herald.wait_ready(timeout=60)


async def test_a_retiring_workers_last_deliveries_count_after_sighup(launch):
    # Deliveries are folded into the metrics every sync_interval; an hour means only the
    # fold a worker does on its way out can count them: the one SIGHUP used to drop.
    herald = await launch(workers=1, env={"HERALD_METRICS_SYNC_INTERVAL": "3600"})
    tokens = await make_users(herald.base)
    count = 5
    async with aiohttp.ClientSession() as session, session.ws_connect(herald.url("/ws")) as ws:
        assert (await ws.receive_json(timeout=10))["op"] == "welcome"
        await ws.send_json({"op": "subscribe", "id": 1, "channel": CHANNEL})
        assert (await ws.receive_json(timeout=10))["op"] == "ok"
        for n in range(count):
            await publish_one(session, herald, tokens.publisher, n)
        received = [await ws.receive_json(timeout=10) for _ in range(count)]
        assert [m["data"] for m in received] == list(range(count))
    old = herald.worker_pids()

    herald.signal(signal.SIGHUP)
    await replaced(herald, old)

    text = await scrape(herald, tokens.admin)
    assert sample_sum(text, "herald_events_delivered_total", transport="ws") == count, text
    assert sample_sum(text, "herald_events_published_total") == count, text
    published = sample_sum(text, "herald_http_requests_total", route="/api/channels/{channel}/events", status="201")
    assert published == count, text


async def test_a_killed_workers_counts_stay_and_its_gauges_go(launch):
    herald = await launch(workers=2)
    tokens = await make_users(herald.base)
    requests = 30
    async with fresh_connections() as session:
        for _ in range(requests):
            async with session.get(herald.url("/healthz")) as resp:
                assert resp.status == 200
    async with aiohttp.ClientSession() as session, session.ws_connect(herald.url("/ws")) as ws:
        assert (await ws.receive_json(timeout=10))["op"] == "welcome"

        async def one_open_websocket() -> bool:
            return sample_sum(await scrape(herald, tokens.admin), "herald_connections", transport="ws") == 1

        await wait_for(one_open_websocket, timeout=30)
        old = herald.worker_pids()
        for pid in old:
            os.kill(pid, signal.SIGKILL)  # no exit path runs: only what is already in the store counts
        await replaced(herald, old)

    text = await scrape(herald, tokens.admin)
    assert sample_sum(text, "herald_http_requests_total", route="/healthz", status="200") == requests, text
    assert sample_sum(text, "herald_connections", transport="ws") == 0, text  # the dead worker's gauge is gone


# --- two instances on one database -----------------------------------------------------


async def test_events_cross_instances_sharing_a_database(launch, tmp_path):
    secrets = tmp_path / "shared-secrets"
    a = await launch(workers=1, name="a", secrets_dir=secrets)
    b = await launch(workers=1, name="b", secrets_dir=secrets)
    tokens = await make_users(a.base)  # signed by a, accepted by b: the same secrets
    count = 20
    async with aiohttp.ClientSession() as session, session.ws_connect(a.url("/ws")) as ws:
        assert (await ws.receive_json(timeout=10))["op"] == "welcome"
        await ws.send_json({"op": "subscribe", "id": 1, "channel": CHANNEL})
        reply = await ws.receive_json(timeout=10)
        assert reply["op"] == "ok", reply

        for i in range(count):
            async with session.post(
                b.url(f"/api/channels/{CHANNEL}/events"), json={"data": i}, headers=bearer(tokens.publisher)
            ) as resp:
                assert resp.status == 201, await resp.text()

        received = []
        with contextlib.suppress(TimeoutError):
            while len(received) < count:
                message = await ws.receive_json(timeout=10)
                assert message["op"] == "event", message
                received.append(message)
    assert [(e["offset"], e["data"]) for e in received] == [(i + 1, i) for i in range(count)]


# --- presence across workers; a killed worker takes its presence with it -----------------

PRESENCE_RULES = '[[channels]]\npattern = "room:*"\nsubscribe = ["authenticated"]\npublish = []\npresence = true\n'


async def ws_on_worker(session, herald: Herald, token: str, channel: str, wanted: set[int]):
    """A subscribed WebSocket held by one of the `wanted` workers (fresh connections until one is)."""
    for _ in range(50):
        ws = await session.ws_connect(herald.url(f"/ws?access_token={token}"))
        assert (await ws.receive_json(timeout=10))["op"] == "welcome"
        pid = herald.worker_holding(ws.get_extra_info("sockname")[1])
        if pid in wanted:
            await ws.send_json({"op": "subscribe", "id": 1, "channel": channel})
            reply = await ws.receive_json(timeout=10)
            assert reply["op"] == "ok", reply
            return ws, pid
        await ws.close()
    raise AssertionError(f"no connection landed on {wanted}")


async def test_presence_spans_the_workers_and_a_killed_worker_takes_its_entries_within_30s(launch):
    herald = await launch(workers=2, rules=PRESENCE_RULES + CHANNEL_RULES, env={"HERALD_REALTIME_PRESENCE_GRACE": "0"})
    tokens = await make_users(herald.base)  # two users: root (admin) and pub
    channel = "room:kill"
    async with fresh_connections(total=None) as session:
        workers = herald.worker_pids()
        root_ws, root_pid = await ws_on_worker(session, herald, tokens.admin, channel, workers)
        pub_ws, victim = await ws_on_worker(session, herald, tokens.publisher, channel, workers - {root_pid})
        try:

            async def presence() -> tuple[int, list[str]]:
                async with session.get(
                    herald.url(f"/api/channels/{channel}/presence"), headers=bearer(tokens.admin)
                ) as r:
                    assert r.status == 200, await r.text()
                    body = await r.json()
                return body["clients"], [u["username"] for u in body["users"]]

            started = time.monotonic()
            await wait_for(lambda: presence_is(presence, (2, ["root", "pub"])), timeout=2)
            print(f"both workers' subscribers listed after {time.monotonic() - started:.2f}s")
            join = await root_ws.receive_json(timeout=10)
            assert (join["op"], join["user"]["username"]) == ("join", "pub"), join

            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            leave = await root_ws.receive_json(timeout=30)
            assert (leave["op"], leave["channel"], leave["user"]["username"]) == ("leave", channel, "pub"), leave
            left_after = time.monotonic() - killed_at
            assert left_after < 30, left_after
            assert await presence() == (1, ["root"])
            print(f"the killed worker's entries were gone and its user's leave sent after {left_after:.1f}s")
        finally:
            await root_ws.close()
            await pub_ws.close()


async def presence_is(read: Callable[[], Awaitable[Any]], expected: Any) -> bool:
    return await read() == expected


# --- issue 10: every fault at once, answers stay honest --------------------------------


class KeepAlivePublisher:
    """Publishes on one keep-alive connection, without an Idempotency-Key, and keeps every answer."""

    def __init__(self, herald: Herald, token: str, name: str) -> None:
        self.herald = herald
        self.token = token
        self.name = name
        self.stored: dict[str, int] = {}  # data -> offset, for each 201
        self.refused_5xx: list[tuple[str, int]] = []
        self.cuts: list[tuple[float, str]] = []  # (when, what): a request sent and never answered
        self.sent = 0

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sent += 1
            data = f"{self.name}-{self.sent}"
            try:
                async with session.post(
                    self.herald.url(f"/api/channels/{CHANNEL}/events"), json={"data": data}, headers=bearer(self.token)
                ) as resp:
                    body = await resp.read()
                    if resp.status == 201:
                        self.stored[data] = orjson.loads(body)["offset"]
                    elif resp.status >= 500:
                        self.refused_5xx.append((data, resp.status))
                    else:
                        raise AssertionError(f"{data}: {resp.status} {body!r}")
            except aiohttp.ClientConnectorError:
                pass  # never reached a worker
            except NETWORK_ERRORS as exc:
                self.cuts.append((time.monotonic(), f"{data}: {exc!r}"))
            await asyncio.sleep(0.01)


async def readyz_ok(herald: Herald) -> bool:
    async with fresh_connections(total=2) as session:
        with contextlib.suppress(*NETWORK_ERRORS):
            async with session.get(herald.url("/readyz")) as resp:
                return resp.status == 200
    return False


async def test_faults_together_lose_nothing_store_no_refused_publish_and_cut_no_request(launch, postgres):
    """kill -9 a worker, restart PostgreSQL, SIGHUP, under keep-alive publishers and WS+SSE subscribers."""
    postgres.require_embedded()
    herald = await launch(workers=2)
    tokens = await make_users(herald.base)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    publishers = [KeepAlivePublisher(herald, tokens.publisher, f"p{n}") for n in range(3)]
    kill_window: tuple[float, float] = (0.0, 0.0)
    async with (
        fresh_connections(total=None) as subscribe_session,
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=15)) as keep,
    ):
        try:
            subscribers = [Subscriber(herald, subscribe_session, "ws", f"ws{n}") for n in range(2)]
            subscribers += [Subscriber(herald, subscribe_session, "sse", f"sse{n}") for n in range(2)]
            tasks += [asyncio.create_task(s.run(), name=s.name) for s in subscribers]
            await wait_for(lambda: all(s.client_port for s in subscribers), timeout=20)
            tasks += [asyncio.create_task(p.run(keep, stop), name=p.name) for p in publishers]

            def published() -> int:
                return sum(len(p.stored) for p in publishers)

            async def progress(more: int) -> None:
                target = published() + more

                async def reached() -> bool:
                    await first_done(tasks)
                    return published() >= target

                await wait_for(reached, timeout=30)

            await progress(50)
            # 1. kill -9 a worker: what it held is cut (it cannot answer); it is replaced.
            victim = sorted(herald.worker_pids())[0]
            survivors = herald.worker_pids() - {victim}
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            await wait_for(lambda: len(herald.worker_pids() - survivors) == 1, timeout=15)
            await herald.wait_ready()
            kill_window = (killed_at, time.monotonic() + 1.0)
            await progress(50)

            # 2. restart PostgreSQL: publishes answer 503 meanwhile, /readyz is 200 within 1 s of it being back.
            postgres.stop()
            try:
                await wait_for(lambda: any(p.refused_5xx for p in publishers), timeout=15)
            finally:
                postgres.start()
            back = time.monotonic()
            await wait_for(lambda: readyz_ok(herald), timeout=10, interval=0.05)
            ready_in = time.monotonic() - back
            assert ready_in < 1.0, f"/readyz 200 only {ready_in:.2f}s after the database was back"
            await progress(50)

            # 3. SIGHUP: every worker replaced; no request that reached one is cut.
            old = herald.worker_pids()
            herald.signal(signal.SIGHUP)
            await wait_for(lambda: len(new := herald.worker_pids()) == 2 and new.isdisjoint(old), timeout=60)
            await progress(50)
        finally:
            stop.set()
            await asyncio.gather(*(t for t in tasks if t.get_name().startswith("p")), return_exceptions=True)

        try:
            async with aiohttp.ClientSession() as session:
                stored = await history(session, herald.base, CHANNEL)
            offsets = [e["offset"] for e in stored]
            assert offsets == list(range(1, len(offsets) + 1))
            by_data = {e["data"]: e["offset"] for e in stored}
            answered_201 = {data: offset for p in publishers for data, offset in p.stored.items()}
            assert {d: by_data.get(d) for d in answered_201} == answered_201  # each 201 stored, where it said
            refused = [data for p in publishers for data, _ in p.refused_5xx]
            assert all(status == 503 for p in publishers for _, status in p.refused_5xx)
            assert not [d for d in refused if d in by_data], "a publish answered 5xx was stored"
            cuts = [(when, what) for p in publishers for when, what in p.cuts]
            outside_the_kill = [what for when, what in cuts if not kill_window[0] <= when <= kill_window[1]]
            assert not outside_the_kill, f"requests cut outside the kill -9: {outside_the_kill}"

            async def caught_up() -> bool:
                await first_done(tasks[: len(subscribers)])
                return all(s.seen and s.seen[-1] >= offsets[-1] for s in subscribers)

            await wait_for(caught_up, timeout=30)
            for s in subscribers:  # every stored event exactly once, in order, on both transports
                assert s.seen == offsets, f"{s.name} saw {len(s.seen)} of {len(offsets)}: drops {s.drops}"
            print(f"stored {len(offsets)}; 503s {len(refused)}; cut by the kill {len(cuts)}; ready {ready_in:.2f}s")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
