"""Presence at scale: 5000 subscribers on one presence channel, 1000 of them reconnecting at once.

    .venv/bin/python -m bench.presence [--subscribers 5000] [--reconnect 1000] [--queries 300]

One Herald worker on core 0 (with its embedded PostgreSQL), this load generator on core 1,
loopback only. Every subscriber is a distinct user on a WebSocket. In one run:

1. the baseline: every subscriber connects and subscribes to a channel without presence;
   the server's CPU (with the database) over the connects and one second after, per connect;
2. the same on a channel with presence on: the extra CPU per connect is the difference;
3. the presence query (GET /api/channels/{channel}/presence, 5000 users in the answer):
   p50 / p99 over --queries sequential requests while idle, and while the storm runs;
4. the storm: --reconnect subscribers close and reconnect at once (a deploy, a network
   blip); how many join/leave messages each remaining subscriber received, counted until
   the grace period has passed since the last reconnect (goal: none).

Bounded in time (each wait has a deadline); results go to bench/results/presence-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from bench import BenchError
from bench.recorder import Recorder
from bench.servers import Server, cpu_snapshot, free_port, herald_env, login, spawn, stop, wait_ready
from bench.subscribers import WsSubscriber
from server.identity.auth import TokenService
from server.settings import AuthSettings

RESULTS = Path(__file__).resolve().parent / "results"
JWT_SECRET = "bench-presence-secret-" + "x" * 32
GRACE = 5.0  # realtime.presence_grace: its default
PRESENCE_CHANNEL, PLAIN_CHANNEL = "room:bench", "plain:bench"
CONNECT_CONCURRENCY = 100
PRESENCE_OPS = (b'{"op":"join"', b'{"op":"leave"')
DEADLINE = 120.0

SETTINGS = """\
[auth]
secrets_dir = {secrets_dir}
jwt_secret = "{secret}"
bcrypt_rounds = 4

[limits]
rate = 0
connections_per_ip = 100000  # every subscriber comes from 127.0.0.1

[realtime]
presence_grace = {grace}

[[channels]]
pattern = "room:*"
subscribe = ["authenticated"]
publish = ["publisher"]
presence = true

[[channels]]
pattern = "*"
subscribe = ["authenticated"]
publish = ["publisher"]
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.presence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=5000, help="subscribers, one user each (5000)")
    parser.add_argument("--reconnect", type=int, default=1000, help="subscribers reconnecting at once (1000)")
    parser.add_argument("--queries", type=int, default=300, help="presence queries per measurement (300)")
    return parser.parse_args(argv)


def start(workdir: Path) -> Server:
    settings = workdir / "settings.toml"
    secrets_dir = json.dumps(str(workdir / "secrets"))
    settings.write_text(SETTINGS.format(secrets_dir=secrets_dir, secret=JWT_SECRET, grace=GRACE))
    port = free_port()
    args = [sys.executable, "run.py", "serve", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--workers", "1", "--settings", str(settings)]
    return spawn("herald", port, args, herald_env(workdir), workdir, 0)


class PresenceSubscriber(WsSubscriber):
    """The bench's lean WebSocket subscriber (bench/subscribers.py) as one user, counting the
    join/leave frames it receives without decoding them: with 5000 users arriving one by one,
    a subscriber receives thousands of joins, which aiohttp's client could not keep up with."""

    def __init__(self, channel: str, index: int, recorder: Recorder, token: str) -> None:
        super().__init__(channel, index, recorder)
        self.token = token
        self.presence_messages = 0

    def path(self) -> str:
        return f"/ws?access_token={self.token}"

    def request(self, port: int) -> bytes:
        return super().request(port).replace(b"GET /ws ", f"GET {self.path()} ".encode(), 1)

    def on_text(self, text: bytes, received_ns: int) -> None:
        if text.startswith(PRESENCE_OPS):
            self.presence_messages += 1
        elif not text.startswith(b'{"op":"event"'):
            self.replies.put_nowait(orjson.loads(text))


class Subscriber:
    """Opens (and reopens) one user's subscription; keeps the count across reconnects."""

    def __init__(self, server: Server, token: str, channel: str, recorder: Recorder, index: int) -> None:
        self.server, self.token, self.channel, self.recorder, self.index = server, token, channel, recorder, index
        self.stream: PresenceSubscriber | None = None
        self.counted = 0

    @property
    def presence_messages(self) -> int:
        return self.counted + (self.stream.presence_messages if self.stream else 0)

    def reset(self) -> None:
        self.counted = 0
        if self.stream:
            self.stream.presence_messages = 0

    async def open(self) -> None:
        channel, index, recorder, token = self.channel, self.index, self.recorder, self.token
        loop = asyncio.get_running_loop()
        _, stream = await loop.create_connection(
            lambda: PresenceSubscriber(channel, index, recorder, token), "127.0.0.1", self.server.port
        )
        try:
            stream.transport.write(stream.request(self.server.port))
            await stream.head
            await stream.handshake()
        except BaseException:
            stream.discard()
            raise
        self.stream = stream

    async def close(self) -> None:
        if self.stream is not None:
            self.counted += self.stream.presence_messages
            self.stream.close()
            try:
                await asyncio.wait_for(asyncio.shield(self.stream.finished), 10)
            except TimeoutError:
                self.stream.discard()
            self.stream = None


async def bounded(coros, limit: int) -> None:
    semaphore = asyncio.Semaphore(limit)

    async def one(coro):
        async with semaphore:
            await coro

    await asyncio.wait_for(asyncio.gather(*(one(c) for c in coros)), DEADLINE)


async def presence_of(session: aiohttp.ClientSession, server: Server, channel: str) -> dict:
    async with session.get(server.url(f"/api/channels/{channel}/presence"), headers=server.auth_headers()) as r:
        if r.status != 200:
            raise BenchError(f"presence query answered {r.status}: {(await r.text())[:200]}")
        return orjson.loads(await r.read())


async def wait_clients(session, server: Server, channel: str, expected: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while (await presence_of(session, server, channel))["clients"] != expected:
        if time.monotonic() > deadline:
            raise BenchError(f"{channel}: presence never reached {expected} clients")
        await asyncio.sleep(0.1)


async def query_times(session, server: Server, channel: str, count: int, stop_at: asyncio.Event | None = None):
    times = []
    for _ in range(count):
        if stop_at is not None and stop_at.is_set():
            break
        started = time.perf_counter()
        await presence_of(session, server, channel)
        times.append((time.perf_counter() - started) * 1000)
    return times


def percentiles(times: list[float]) -> dict:
    if len(times) < 2:
        return {"p50_ms": None, "p99_ms": None, "n": len(times)}
    cuts = statistics.quantiles(times, n=100)
    return {"p50_ms": round(cuts[49], 2), "p99_ms": round(cuts[98], 2), "max_ms": round(max(times), 2), "n": len(times)}


async def connect_all(subscribers: list[Subscriber], server: Server) -> float:
    """CPU seconds of the server (database included) over the connects and one quiet second after."""
    before = cpu_snapshot(server)
    await bounded([s.open() for s in subscribers], CONNECT_CONCURRENCY)
    await asyncio.sleep(1.0)  # the debounced presence writes and the roster's reads land in the window
    return cpu_snapshot(server).server - before.server


async def storm(subscribers: list[Subscriber]) -> float:
    """Close them all, then reopen them all at once: seconds until every one is subscribed again."""
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(s.close() for s in subscribers)), DEADLINE)
    await bounded([s.open() for s in subscribers], len(subscribers))
    return time.monotonic() - started


async def make_users(session: aiohttp.ClientSession, server: Server, count: int) -> list[str]:
    tokens = TokenService(AuthSettings(jwt_secret=JWT_SECRET))
    made: list[str] = [""] * count

    async def create(i: int) -> None:
        body = {"username": f"user{i:05d}", "password": "bench-password-1", "roles": []}
        async with session.post(server.url("/api/users"), json=body, headers=server.auth_headers()) as r:
            if r.status != 201:
                raise BenchError(f"creating a user answered {r.status}: {(await r.text())[:200]}")
            user = await r.json()
        made[i] = tokens.issue(str(user["id"]), user["username"], [])

    await bounded([create(i) for i in range(count)], 16)
    return made


async def run(args: argparse.Namespace, workdir: Path) -> dict:
    server = start(workdir)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            await wait_ready(session, server, 90)
            server.token = await login(session, server)
            print(f"creating {args.subscribers} users", file=sys.stderr)
            tokens = await make_users(session, server, args.subscribers)

            print(f"baseline: a channel without presence ({time.strftime('%X')})", file=sys.stderr)
            recorder = Recorder()
            plain = [Subscriber(server, t, PLAIN_CHANNEL, recorder, i) for i, t in enumerate(tokens)]
            plain_cpu = await connect_all(plain, server)
            plain_storm = await storm(plain[: args.reconnect])
            await bounded([s.close() for s in plain], CONNECT_CONCURRENCY)
            await asyncio.sleep(1.0)

            print("the same on a presence channel", file=sys.stderr)
            subs = [Subscriber(server, t, PRESENCE_CHANNEL, recorder, i) for i, t in enumerate(tokens)]
            presence_cpu = await connect_all(subs, server)
            await wait_clients(session, server, PRESENCE_CHANNEL, args.subscribers)
            await asyncio.sleep(GRACE + 1)  # joins of the connect phase delivered; counting starts now
            joins_at_connect = sum(s.presence_messages for s in subs)
            for s in subs:
                s.reset()

            idle = await query_times(session, server, PRESENCE_CHANNEL, args.queries)
            answer = await presence_of(session, server, PRESENCE_CHANNEL)

            print(f"storm: {args.reconnect} reconnect at once", file=sys.stderr)
            remaining = subs[args.reconnect :]
            storm_done = asyncio.Event()
            querier = asyncio.create_task(query_times(session, server, PRESENCE_CHANNEL, 10**6, storm_done))
            reconnected_in = await storm(subs[: args.reconnect])
            await wait_clients(session, server, PRESENCE_CHANNEL, args.subscribers)
            storm_done.set()
            during = await querier
            await asyncio.sleep(GRACE + 2)  # any leave would be out by now
            received = [s.presence_messages for s in remaining]
            await bounded([s.close() for s in subs], CONNECT_CONCURRENCY)
        finally:
            stop(server)
    n = args.subscribers
    return {
        "subscribers": n,
        "reconnecting": args.reconnect,
        "grace_s": GRACE,
        "users_in_answer": len(answer["users"]),
        "joins_received_during_connects": joins_at_connect,
        "answer_bytes": len(orjson.dumps(answer)),
        "query_idle": percentiles(idle),
        "query_during_storm": percentiles(during),
        "storm_reconnected_in_s": round(reconnected_in, 2),
        "storm_without_presence_reconnected_in_s": round(plain_storm, 2),
        "presence_messages_per_remaining": {
            "mean": round(statistics.fmean(received), 3),
            "max": max(received),
            "total": sum(received),
        },
        "cpu_ms_per_connect": {
            "without_presence": round(1000 * plain_cpu / n, 3),
            "with_presence": round(1000 * presence_cpu / n, 3),
            "extra": round(1000 * (presence_cpu - plain_cpu) / n, 3),
            "ratio": round(presence_cpu / plain_cpu, 2) if plain_cpu else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.sched_setaffinity(0, {1} if os.cpu_count() and os.cpu_count() > 1 else {0})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.subscribers + 1000)), hard))
    with tempfile.TemporaryDirectory(prefix="herald-bench-presence-") as tmp:
        try:
            result = asyncio.run(run(args, Path(tmp)))
        except BenchError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
    q, s, c = result["query_idle"], result["query_during_storm"], result["cpu_ms_per_connect"]
    m = result["presence_messages_per_remaining"]
    print(f"\nPresence: {result['subscribers']} subscribers (one user each) on one channel, 1 worker")
    print(f"presence query ({result['users_in_answer']} users, {result['answer_bytes']:,} bytes):")
    print(f"  idle         p50 {q['p50_ms']} ms, p99 {q['p99_ms']} ms (goal p99 <= 50 ms), n={q['n']}")
    print(f"  during storm p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, n={s['n']}")
    print(
        f"storm: {result['reconnecting']} reconnected in {result['storm_reconnected_in_s']} s "
        f"({result['storm_without_presence_reconnected_in_s']} s without presence, grace {GRACE:g} s); "
        f"join/leave per remaining subscriber: mean {m['mean']}, max {m['max']} (goal 0)"
    )
    print(f"joins received while everyone connected: {result['joins_received_during_connects']:,} in all")
    print(
        f"CPU per connect (server + database): {c['without_presence']} ms without presence, "
        f"{c['with_presence']} ms with: +{c['extra']} ms ({c['ratio']}x)"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"presence-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
