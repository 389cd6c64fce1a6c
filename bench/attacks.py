"""The red team's memory and descriptor attacks, bounded, on loopback: `python -m bench.attacks`.

A 2-worker Herald on this machine, clients on several loopback source addresses:

- memory: 40 history requests for `limit=1000` of ~60 KB events, 40 WebSockets
  subscribing from offset 0 and 20 SSE streams with an old `Last-Event-ID`, none of
  which ever reads. Figures: the workers' RSS before, at its peak during, and after the
  clients left; `GET /healthz` latency during.
- descriptors: idle TCP connections from three addresses (past the workers'
  `max_connections`), slowloris connections sending a header byte every 2 s, and one
  address opening WebSockets and SSE streams in a loop. Figures: `/healthz` answered
  during the attack, how many of the attacker's connections Herald had closed by the
  end, and how many WebSockets/SSE streams one address got (the per-address cap).

Every count and duration is bounded by the flags; only 127.0.0.x is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from bench import BenchError
from bench.servers import (
    HERALD_SETTINGS,
    REPO_ROOT,
    Server,
    free_port,
    herald_env,
    login,
    server_rss,
    settled_rss,
    stop,
    wait_ready,
)
from server.realtime.wire import channel_set_tag, encode_cursor

CHANNEL = "public:big"
EVENT_DATA = "x" * 60_000
MB = 1 << 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", nargs="?", choices=("memory", "descriptors", "both"), default="both")
    parser.add_argument("--events", type=int, default=1000, help="~60 KB events stored first (memory)")
    parser.add_argument("--hold", type=float, default=15.0, help="seconds the attack holds on")
    parser.add_argument("--idle", type=int, default=3000, help="idle TCP connections (descriptors)")
    parser.add_argument("--max-connections", type=int, default=1000, help="server.max_connections per worker")
    parser.add_argument("--flood", type=int, default=400, help="WebSockets and SSE streams tried from one address")
    parser.add_argument("--repo", type=Path, default=REPO_ROOT, help="the checkout to run (a baseline: git archive)")
    args = parser.parse_args(argv)
    if args.events > 5000 or args.idle > 10000 or args.flood > 2000 or args.hold > 120:
        parser.error("kept bounded: --events <= 5000, --idle <= 10000, --flood <= 2000, --hold <= 120")
    return args


# clients that never read


async def open_from(source: str, port: int, rcvbuf: int = 4096) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # a small window: the server's writes back up
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


def masked_text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


async def history_hog(port: int, source: str) -> asyncio.StreamWriter:
    _, writer = await open_from(source, port)
    writer.write(f"GET /api/channels/{CHANNEL}/events?limit=1000 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return writer


async def websocket_hog(port: int, source: str) -> asyncio.StreamWriter:
    reader, writer = await open_from(source, port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    writer.write(masked_text_frame(orjson.dumps({"op": "subscribe", "channel": CHANNEL, "offset": 0})))
    return writer


async def sse_hog(port: int, source: str) -> asyncio.StreamWriter:
    _, writer = await open_from(source, port)
    cursor = encode_cursor(channel_set_tag((CHANNEL,)), [0])
    writer.write(f"GET /sse?channel={CHANNEL} HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {cursor}\r\n\r\n".encode())
    return writer


# what the attack costs others


async def healthz_latencies(server: Server, seconds: float) -> dict:
    """GET /healthz on a fresh connection every 0.2 s: the figure a load balancer sees."""
    latencies, failures = [], 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                async with session.get(server.url("/healthz"), timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    await resp.read()
                    if resp.status == 200:
                        latencies.append((time.perf_counter() - started) * 1000)
                    else:
                        failures += 1
            except (aiohttp.ClientError, TimeoutError, OSError):
                failures += 1
            await asyncio.sleep(0.2)
    return {
        "healthz_ok": len(latencies),
        "healthz_failed": failures,
        "healthz_median_ms": round(statistics.median(latencies), 1) if latencies else None,
        "healthz_max_ms": round(max(latencies), 1) if latencies else None,
    }


async def peak_rss(server: Server, seconds: float) -> int:
    peak, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, server_rss(server))
        await asyncio.sleep(0.25)
    return peak


# scenarios


async def store_big_events(server: Server, count: int) -> None:
    headers = {"Authorization": f"Bearer {server.token}"}
    body = orjson.dumps({"type": "big", "data": EVENT_DATA})
    async with aiohttp.ClientSession(headers=headers) as session:
        sem = asyncio.Semaphore(16)

        async def one() -> None:
            async with (
                sem,
                session.post(
                    server.url(f"/api/channels/{CHANNEL}/events"),
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as resp,
            ):
                if resp.status != 201:
                    raise BenchError(f"publish answered {resp.status}: {(await resp.text())[:200]}")

        await asyncio.gather(*(one() for _ in range(count)))


async def memory(server: Server, args: argparse.Namespace) -> dict:
    await store_big_events(server, args.events)
    before = await settled_rss(server)
    sources = [f"127.0.0.{i}" for i in range(2, 12)]
    writers = []
    writers += [await history_hog(server.port, sources[i % 10]) for i in range(40)]
    writers += [await websocket_hog(server.port, sources[i % 10]) for i in range(40)]
    writers += [await sse_hog(server.port, sources[i % 10]) for i in range(20)]
    peak, health = await asyncio.gather(peak_rss(server, args.hold), healthz_latencies(server, args.hold))
    for writer in writers:
        writer.transport.abort()
    after = await settled_rss(server)
    return {
        "scenario": "memory",
        "stored_mb": round(args.events * len(EVENT_DATA) / MB),
        "clients": len(writers),
        "rss_before_mb": round(before / MB),
        "rss_peak_mb": round(peak / MB),
        "rss_after_mb": round(after / MB),
        "rss_peak_growth_mb": round((peak - before) / MB),
        **health,
    }


async def still_open(writers: list[asyncio.StreamWriter]) -> int:
    return sum(1 for w in writers if not w.transport.is_closing() and not w.transport.get_extra_info("eof"))


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True when the server ended the connection (EOF or reset), whatever it sent before."""
    try:
        while await asyncio.wait_for(reader.read(65536), 0.05):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


async def descriptors(server: Server, args: argparse.Namespace) -> dict:
    sources = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    refused_connect = 0
    for i in range(args.idle):
        try:
            idle.append(await open_from(sources[i % 3], server.port, rcvbuf=65536))
        except OSError:
            refused_connect += 1
    slow = [await open_from("127.0.0.5", server.port) for _ in range(200)]
    for _, writer in slow:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")

    async def drip() -> None:
        deadline = time.monotonic() + args.hold
        while time.monotonic() < deadline:
            for _, writer in slow:
                if not writer.transport.is_closing():
                    writer.write(b"X")
            await asyncio.sleep(2)

    async def flood() -> dict:
        accepted = {"ws": 0, "sse": 0}
        refused = {"ws": 0, "sse": 0}
        held = []
        connector = aiohttp.TCPConnector(limit=0, local_addr=("127.0.0.6", 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(args.flood):
                try:
                    held.append(await session.ws_connect(server.url("/ws")))
                    accepted["ws"] += 1
                except aiohttp.WSServerHandshakeError as exc:
                    key = "ws" if exc.status == 429 else f"ws_{exc.status}"
                    refused[key] = refused.get(key, 0) + 1
                resp = await session.get(server.url(f"/sse?channel={CHANNEL}"))
                if resp.status == 200:
                    accepted["sse"] += 1
                    held.append(resp)
                else:
                    refused["sse"] += 1
                    resp.release()
            for item in held:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    if isinstance(item, aiohttp.ClientWebSocketResponse):
                        await item.close()
                    else:
                        item.close()
        return {"flood_accepted": accepted, "flood_refused_429": refused}

    started = time.monotonic()
    health, _ = await asyncio.gather(healthz_latencies(server, args.hold), drip())
    closed_idle = sum(await asyncio.gather(*(closed_by_server(reader) for reader, _ in idle)))
    closed_slow = sum(await asyncio.gather(*(closed_by_server(reader) for reader, _ in slow)))
    held = round(time.monotonic() - started, 1)
    for _, writer in idle + slow:
        writer.transport.abort()
    # Then one address opens WebSockets and SSE streams in a loop and keeps them.
    flood_health, flooded = await asyncio.gather(healthz_latencies(server, 5), flood())
    return {
        "scenario": "descriptors",
        "max_connections_per_worker": args.max_connections,
        "idle_connections": len(idle),
        "idle_connect_failed": refused_connect,
        "idle_closed_by_server": closed_idle,
        "slowloris_connections": len(slow),
        "slowloris_closed_by_server": closed_slow,
        "held_s": held,
        **health,
        **flooded,
        **{f"flood_{k}": v for k, v in flood_health.items()},
    }


def start_attacked_herald(workdir: Path, args: argparse.Namespace) -> Server:
    """The bench's Herald (2 workers), with max_connections low enough to reach, from `--repo`."""
    settings = workdir / "settings.toml"
    text = HERALD_SETTINGS.format(secrets_dir=orjson.dumps(str(workdir / "secrets")).decode())
    if args.max_connections:
        text += f"\n[server]\nmax_connections = {args.max_connections}\n"
    settings.write_text(text)
    port = free_port()
    command = [sys.executable, "run.py", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "2", "--settings", str(settings)]
    log_path = workdir / "herald.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=args.repo, env=herald_env(workdir), stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    return Server("herald", port, process, log_path)


async def run(args: argparse.Namespace) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="herald-attacks-") as tmp:
        server = start_attacked_herald(Path(tmp), args)
        try:
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, server, 120)
                server.token = await login(session, server)
            if args.scenario in ("memory", "both"):
                results.append(await memory(server, args))
                print(orjson.dumps(results[-1]).decode(), flush=True)
            if args.scenario in ("descriptors", "both"):
                results.append(await descriptors(server, args))
                print(orjson.dumps(results[-1]).decode(), flush=True)
            if server.process.poll() is not None:
                raise BenchError(f"Herald exited during the attack:\n{server.log_tail()}")
        finally:
            stop(server)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        asyncio.run(run(args))
    except BenchError as exc:
        print(f"attacks: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
