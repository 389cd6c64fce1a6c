"""Publish throughput and latency: Herald against the naive server, in one run.

    .venv/bin/python -m bench.publish [--seconds 5] [--concurrency 32] [--rate 500]

Three servers, one after another: the naive server (counts in memory, core 0), Herald
with one worker (core 0; its embedded PostgreSQL, which would otherwise inherit that one
core, free to run on both, as a database server elsewhere would not share Herald's core)
and Herald with two workers (everything on both cores); the load generator runs on core 1. Herald stores every
event in PostgreSQL (group-committed: concurrent publishes share one statement and one
commit) before answering 201. For each server:

- single-event REST publishes, `--concurrency` in flight, on 1 and on 16 channels;
- batches of 100 events (`POST /api/events`, over 16 channels), 8 batches in flight
  (these two from wrk, which drives 2-3x the load an aiohttp client here does);
- latency (p50/p99) of single publishes sent at a steady `--rate` events/s over 16
  channels, each measured from the moment it was due (so a stall is not hidden);
- for Herald with one worker also: events published from SQL by an application
  (`herald.publish`, PROTOCOL §12), one event per transaction on 32 connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg
import orjson

from bench import BenchError
from bench.servers import Server, login, pin_database, start_herald, start_naive, stop, wait_ready

RESULTS = Path(__file__).resolve().parent / "results"
CHANNEL_COUNTS = (1, 16)  # one channel: every publish is ordered behind the one before (gapless offsets)
BATCH_SIZE, BATCH_CHANNELS, BATCHES_IN_FLIGHT = 100, 16, 8
DATA = {"text": "x" * 100}
GOALS = {"single": 0.7, "batch": 20_000, "p99_ms": 10.0}


def p99(ordered: list[float]) -> float:
    """The 99th percentile of values already sorted."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of each measurement (5)")
    parser.add_argument("--concurrency", type=int, default=32, help="single publishes in flight (32)")
    parser.add_argument("--rate", type=float, default=500.0, help="events/s of the latency measurement (500)")
    return parser.parse_args(argv)


async def closed_loop(seconds: float, concurrency: int, send: Callable[[int], Awaitable[int]]) -> tuple[int, float]:
    """`concurrency` loops, each sending as soon as its previous answer came; returns (events, seconds taken).

    The count is added after the await, never as `stored += await send()`: that reads `stored`
    before suspending and writes it back after, so every other loop's additions made meanwhile
    were lost (32 loops on one channel reported 5 events/s for some 300 stored).
    """
    stored = 0
    deadline = time.monotonic() + seconds

    async def loop(index: int) -> None:
        nonlocal stored
        while time.monotonic() < deadline:
            sent = await send(index)
            stored += sent

    start = time.monotonic()
    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    return stored, time.monotonic() - start


def single_sender(session: aiohttp.ClientSession, server: Server, channels: int, prefix: str):
    headers = {"Content-Type": "application/json", **server.auth_headers()}
    body = orjson.dumps({"type": "bench", "data": DATA})

    async def send(index: int) -> int:
        url = server.url(f"/api/channels/{prefix}-{index % channels}/events")
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 201:
                raise BenchError(f"POST answered {response.status}: {(await response.text())[:200]}")
            await response.read()  # an unread body would close the connection instead of reusing it
        return 1

    return send


async def steady_latency(session: aiohttp.ClientSession, server: Server, seconds: float, rate: float, prefix: str):
    """p50 and p99 in ms of publishes due every 1/rate s; each timed from when it was due."""
    send = single_sender(session, server, 16, prefix)
    latencies: list[float] = []
    count = int(seconds * rate)
    start = time.perf_counter() + 0.05

    async def one(n: int) -> None:
        due = start + n / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        await send(n)
        latencies.append((time.perf_counter() - due) * 1000)

    await asyncio.gather(*(one(n) for n in range(count)))
    latencies.sort()
    return statistics.median(latencies), p99(latencies)


def served_latencies(server: Server, path_prefix: str) -> list[float]:
    """Herald's own view of those publishes (its access log's duration_ms), sorted: no client in it."""
    found = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if '"logger":"herald.access"' in line and path_prefix in line:
            with contextlib.suppress(ValueError, KeyError):
                found.append(float(json.loads(line)["duration_ms"]))
    return sorted(found)


def database_url(workdir: Path) -> str:
    """The database the Herald under test uses: DATABASE_URL, else its embedded PostgreSQL's socket."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    from pgserver.utils import PostmasterInfo  # read-only: the server's own postmaster.pid

    info = PostmasterInfo.read_from_pgdata(workdir / "pgdata")
    if info is None:
        raise BenchError("the embedded PostgreSQL of the Herald under test is not running")
    return info.get_uri(database="herald")


SQL_STORED = "SELECT coalesce(sum(last_offset), 0)::bigint FROM herald.channels WHERE name = ANY ($1::text[])"


async def sql_publish_for(url: str, seconds: float, connections: int, channels: int) -> float:
    """Events per second published by an application from SQL, one event per transaction.

    The client's count is checked against the channels' offsets in the database, so a
    counting mistake here cannot pass for a slow database again.
    """
    pool = await asyncpg.create_pool(url, min_size=connections, max_size=connections)
    data = orjson.dumps(DATA).decode()
    names = [f"bench-sql-{channels}-{i}" for i in range(channels)]

    async def send(index: int) -> int:
        async with pool.acquire() as conn, conn.transaction():
            await conn.fetchval("SELECT herald.publish($1, 'bench', $2::jsonb)", names[index % channels], data)
        return 1

    try:
        before = await pool.fetchval(SQL_STORED, names)
        sent, elapsed = await closed_loop(seconds, connections, send)
        stored = await pool.fetchval(SQL_STORED, names) - before
    finally:
        await pool.close()
    if stored != sent:
        raise BenchError(f"SQL publishes: {sent} counted by the client, {stored} stored in the database")
    return stored / elapsed


WRK_SCRIPT = """
local paths = {%(paths)s}
local i = 0
wrk.method = "POST"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
%(auth)s
request = function()
  i = i + 1
  return wrk.format(nil, paths[(i %% #paths) + 1])
end
"""


def wrk_rate(server: Server, paths: list[str], body: bytes, connections: int, seconds: float, workdir: Path) -> float:
    """Requests per second answered 2xx, from wrk on the load generator's core (a closed loop)."""
    auth = f'wrk.headers["Authorization"] = "Bearer {server.token}"' if server.token else ""
    script = workdir / "publish.lua"
    script.write_text(
        WRK_SCRIPT % {"paths": ", ".join(json.dumps(p) for p in paths), "body": json.dumps(body.decode()), "auth": auth}
    )
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s", str(script), server.base_url]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 60)
    match = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", result.stdout)
    if match is None:
        raise BenchError(f"unexpected wrk output:\n{result.stdout}{result.stderr}")
    if errors:
        raise BenchError(f"{server.name}: {errors[1]} publishes were not 2xx:\n{result.stdout}")
    return float(match[1])


async def measure(session, server: Server, args: argparse.Namespace, results: dict, sql_url: str | None) -> None:
    def note(what: str, value: object) -> None:
        results[what] = value
        print(f"{server.name}, {what}: {value}", file=sys.stderr)

    workdir = server.log_path.parent
    single = orjson.dumps({"type": "bench", "data": DATA})
    for channels in CHANNEL_COUNTS:
        paths = [f"/api/channels/bench-{channels}-{i}/events" for i in range(channels)]
        rate = await asyncio.to_thread(wrk_rate, server, paths, single, args.concurrency, args.seconds, workdir)
        note(f"single_{channels}", round(rate))
    batch = orjson.dumps(
        {
            "events": [
                {"channel": f"bench-b-{i % BATCH_CHANNELS}", "type": "bench", "data": DATA} for i in range(BATCH_SIZE)
            ]
        }
    )
    rate = await asyncio.to_thread(wrk_rate, server, ["/api/events"], batch, BATCHES_IN_FLIGHT, args.seconds, workdir)
    note("batch_100", round(rate * BATCH_SIZE))
    median, tail = await steady_latency(session, server, args.seconds, args.rate, "bench-steady")
    note("steady_p50_ms", round(median, 2))
    note("steady_p99_ms", round(tail, 2))
    served = served_latencies(server, "/api/channels/bench-steady-")
    if served:
        note("steady_served_p50_ms", round(statistics.median(served), 2))
        note("steady_served_p99_ms", round(p99(served), 2))
    if sql_url is not None:
        for channels in CHANNEL_COUNTS:
            note(f"sql_{channels}", round(await sql_publish_for(sql_url, args.seconds, args.concurrency, channels)))


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, dict]:
    results: dict[str, dict] = {}
    starters = (
        ("naive", lambda: start_naive(workdir / "naive", 0)),
        ("herald-1", lambda: start_herald(workdir / "herald-1", 0, workers=1, name="herald-1")),
        ("herald-2", lambda: start_herald(workdir / "herald-2", {0, 1}, workers=2, name="herald-2")),
    )
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for name, start in starters:
            (workdir / name).mkdir()
            server = start()
            try:
                await wait_ready(session, server, 90)
                if name == "herald-1" and (os.cpu_count() or 1) > 1:
                    pin_database(server, {0, 1})  # another server: not confined to Herald's core
                sql_url = None
                if name != "naive":
                    server.token = await login(session, server)
                    if name == "herald-1":
                        sql_url = database_url(workdir / name)
                results[name] = {}
                await measure(session, server, args, results[name], sql_url)
            finally:
                stop(server)
    return results


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    naive = results["naive"]
    print(f"\nPublish (events stored per second; {args.concurrency} single publishes or 8 batches in flight)")
    print(f"{'what':<34} {'naive':>9} {'herald 1w':>10} {'ratio':>7} {'herald 2w':>10} {'ratio':>7}")
    for key, label in (
        ("single_1", "single, 1 channel"),
        ("single_16", "single, 16 channels"),
        ("batch_100", "batches of 100"),
    ):
        one, two = results["herald-1"][key], results["herald-2"][key]
        print(f"{label:<34} {naive[key]:>9,} {one:>10,} {one / naive[key]:>6.2f}x {two:>10,} {two / naive[key]:>6.2f}x")
    for key, label in (("steady_p50_ms", "p50 ms at a steady rate"), ("steady_p99_ms", "p99 ms at a steady rate")):
        print(f"{label:<34} {naive[key]:>9} {results['herald-1'][key]:>10} {'':>7} {results['herald-2'][key]:>10}")
    served = [
        results[name].get(f"steady_served_{q}_ms", "") for name in ("herald-1", "herald-2") for q in ("p50", "p99")
    ]
    print(f"{'p50 / p99 ms as Herald served them':<34} {'':>9} {served[0]:>5} / {served[1]:<5}", end="")
    print(f" {'':>6} {served[2]:>5} / {served[3]}")
    for channels in CHANNEL_COUNTS:
        sql, rest = results["herald-1"][f"sql_{channels}"], results["herald-1"][f"single_{channels}"]
        print(f"{f'SQL in app transactions, {channels} ch':<34} {'':>9} {sql:>10,} {sql / rest:>6.2f}x of REST")
    one = results["herald-1"]
    single = min(one["single_1"] / naive["single_1"], one["single_16"] / naive["single_16"])
    print(
        f"\ngoals (1 worker): single >= {GOALS['single']}x naive: {single:.2f}x {verdict(single >= GOALS['single'])};",
        end=" ",
    )
    print(
        f"batches >= {GOALS['batch']:,}/s: {one['batch_100']:,} {verdict(one['batch_100'] >= GOALS['batch'])};", end=" "
    )
    p99 = one["steady_p99_ms"]
    print(f"p99 at {args.rate:g}/s <= {GOALS['p99_ms']} ms: {p99} {verdict(p99 <= GOALS['p99_ms'])}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.sched_setaffinity(0, {1} if os.cpu_count() and os.cpu_count() > 1 else {0})
    with tempfile.TemporaryDirectory(prefix="herald-bench-publish-") as tmp:
        try:
            results = asyncio.run(run(args, Path(tmp)))
        except BenchError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
    report(results, args)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"publish-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"results": results, "args": vars(args)}, indent=2))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
