"""Publish throughput: events stored per second, Herald against the naive server, in one run.

    .venv/bin/python -m bench.publish [--seconds 8] [--concurrency 32]

Both servers run on core 0 and the publishers on core 1. Herald stores every event in
PostgreSQL (one statement: offset, insert, NOTIFY) before answering 201; the naive
server only counts in memory, so the ratio shows what durability costs. Beside the REST
figure: events published from SQL by an application (herald.publish, PROTOCOL §12), one
event per transaction (BEGIN, SELECT herald.publish, COMMIT) on 32 connections of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg
import orjson

from bench import BenchError
from bench.servers import Server, login, start_herald, start_naive, stop, wait_ready

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of publishing per server (8)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (32)")
    return parser.parse_args(argv)


async def publish_for(
    session: aiohttp.ClientSession, server: Server, seconds: float, concurrency: int, channels: int
) -> float:
    """Events stored per second with `concurrency` requests in flight spread over `channels`."""
    headers = {"Content-Type": "application/json", **server.auth_headers()}
    body = orjson.dumps({"type": "bench", "data": {"text": "x" * 100}})
    stored = 0
    deadline = time.monotonic() + seconds

    async def publisher(index: int) -> None:
        nonlocal stored
        url = server.url(f"/api/channels/bench-publish-{index % channels}/events")
        while time.monotonic() < deadline:
            async with session.post(url, data=body, headers=headers) as response:
                if response.status != 201:
                    raise BenchError(f"POST answered {response.status}: {(await response.text())[:200]}")
                stored += 1

    start = time.monotonic()
    await asyncio.gather(*(publisher(i) for i in range(concurrency)))
    return stored / (time.monotonic() - start)


def database_url(workdir: Path) -> str:
    """The database the Herald under test uses: DATABASE_URL, else its embedded PostgreSQL's socket."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    from pgserver.utils import PostmasterInfo  # read-only: the server's own postmaster.pid

    info = PostmasterInfo.read_from_pgdata(workdir / "pgdata")
    if info is None:
        raise BenchError("the embedded PostgreSQL of the Herald under test is not running")
    return info.get_uri(database="herald")


async def sql_publish_for(url: str, seconds: float, connections: int, channels: int) -> float:
    """Events per second published by an application from SQL, one event per transaction."""
    pool = await asyncpg.create_pool(url, min_size=connections, max_size=connections)
    data = orjson.dumps({"text": "x" * 100}).decode()
    stored = 0
    deadline = time.monotonic() + seconds

    async def publisher(index: int) -> None:
        nonlocal stored
        channel = f"bench-sql-{index % channels}"
        async with pool.acquire() as conn:
            while time.monotonic() < deadline:
                async with conn.transaction():
                    await conn.fetchval("SELECT herald.publish($1, 'bench', $2::jsonb)", channel, data)
                stored += 1

    try:
        start = time.monotonic()
        await asyncio.gather(*(publisher(i) for i in range(connections)))
        return stored / (time.monotonic() - start)
    finally:
        await pool.close()


CHANNEL_COUNTS = (1, 16)  # one channel: every publish waits for the one before (gapless offsets)


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, dict[int, float]]:
    results: dict[str, dict[int, float]] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for name, start in (("naive", start_naive), ("herald", start_herald)):
            server = start(workdir / name, 0)
            try:
                await wait_ready(session, server, 90)
                if name == "herald":
                    server.token = await login(session, server)
                results[name] = {}
                for channels in CHANNEL_COUNTS:
                    rate = await publish_for(session, server, args.seconds, args.concurrency, channels)
                    results[name][channels] = rate
                    print(f"{name}, {channels} channel(s): {rate:,.0f} events/s", file=sys.stderr)
                if name == "herald":
                    results["sql"] = {}
                    url = database_url(workdir / name)
                    for channels in CHANNEL_COUNTS:
                        rate = await sql_publish_for(url, args.seconds, args.concurrency, channels)
                        results["sql"][channels] = rate
                        print(f"sql, {channels} channel(s): {rate:,.0f} events/s", file=sys.stderr)
            finally:
                stop(server)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.sched_setaffinity(0, {1} if os.cpu_count() and os.cpu_count() > 1 else {0})
    with tempfile.TemporaryDirectory(prefix="herald-bench-publish-") as tmp:
        for name in ("naive", "herald"):
            (Path(tmp) / name).mkdir()
        try:
            results = asyncio.run(run(args, Path(tmp)))
        except BenchError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
    print(f"\nPublish throughput (events stored per second, REST, 1 worker, {args.concurrency} in flight)")
    print(f"{'channels':>8} {'naive (memory)':>15} {'herald (PostgreSQL)':>20} {'herald/naive':>13}", end="")
    print(f" {'SQL in app transactions':>24} {'SQL/REST':>9}")
    for channels in CHANNEL_COUNTS:
        naive, herald, sql = results["naive"][channels], results["herald"][channels], results["sql"][channels]
        print(f"{channels:>8} {naive:15,.0f} {herald:20,.0f} {herald / naive:12.2f}x {sql:24,.0f} {sql / herald:8.2f}x")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"publish-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"events_per_second": results, "args": vars(args)}, indent=2))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
