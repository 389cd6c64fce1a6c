"""Fan-out benchmark: Herald against a naive aiohttp broadcast server, in one run.

For each target: RSS per idle subscribed WebSocket, then for WebSocket and SSE
subscribers on one channel the burst fan-out throughput and the publish→deliver
latency at a steady rate. Run from the repository root:

    .venv/bin/python -m bench.fanout [--target herald|naive|both] [--subscribers N] ...
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import resource
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import aiohttp

from bench import BenchError
from bench.loadgen import Publisher, SubscriberPool
from bench.recorder import WARMUP, Recorder
from bench.report import comparison, format_report, write_json
from bench.servers import STARTERS, Server, cpu_snapshot, cpu_usage, login, settled_rss, stop, wait_ready
from bench.subscribers import TRANSPORTS

TARGETS = ("naive", "herald")
FAILURES = (BenchError, aiohttp.ClientError, OSError, TimeoutError)
WARMUP_ATTEMPTS = 40
WARMUP_INTERVAL = 0.5
BURST_TIMEOUT = 30.0
STEADY_DRAIN_TIMEOUT = 10.0
IDLE_WARMUP_CONNECTIONS = 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target", "--only", dest="target", choices=[*TARGETS, "both"], default="both", help="what to measure"
    )
    parser.add_argument("--subscribers", type=positive, default=1000, help="subscribers per transport")
    parser.add_argument(
        "--idle", type=int, default=2000, help="idle subscribed WebSockets for the RSS figure (0: skip it)"
    )
    parser.add_argument("--events", type=positive, default=200, help="events in the fan-out burst")
    parser.add_argument("--rate", type=positive, default=20, help="events per second in the latency run")
    parser.add_argument("--duration", type=positive, default=10, help="seconds of the latency run")
    parser.add_argument("--startup-timeout", type=positive, default=60, help="seconds to wait for GET /readyz")
    return parser.parse_args(argv)


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def raise_fd_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit: the bench holds thousands of sockets (servers inherit it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pick_cores() -> tuple[int | None, int | None]:
    """(server core, load-generator core); moves this process to the latter. None: one core, no pinning."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        print("warning: only one CPU available: server and load generator share it", file=sys.stderr)
        return None, None
    os.sched_setaffinity(0, {cores[1]})
    return cores[0], cores[1]


def loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    try:
        import uvloop
    except ImportError:
        return None, "asyncio"
    return uvloop.new_event_loop, "uvloop"


def percentile(ordered: list[int], pct: float) -> int:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


async def warm_up(publisher: Publisher, recorder: Recorder, subscribers: int) -> None:
    """Publish warm-up events until every subscriber has received one: then all are surely registered."""
    for seq in range(WARMUP_ATTEMPTS):
        await publisher.publish(WARMUP, seq)
        if await recorder.until(lambda: len(recorder.warmed) >= subscribers, WARMUP_INTERVAL):
            return
    raise BenchError(f"only {len(recorder.warmed)} of {subscribers} subscribers received the warm-up events")


async def measure_burst(
    server: Server, publisher: Publisher, recorder: Recorder, subscribers: int, events: int
) -> dict:
    expected = subscribers * events
    cpu_before = cpu_snapshot(server)
    start_ns = time.time_ns()
    await publisher.burst(events)
    complete = await recorder.until(lambda: recorder.burst_deliveries >= expected, BURST_TIMEOUT)
    cpu = cpu_usage(cpu_before, cpu_snapshot(server))
    delivered = recorder.burst_deliveries
    seconds = (max(recorder.burst_last_ns, start_ns) - start_ns) / 1e9
    return {
        "burst_events": events,
        "deliveries": delivered,
        "deliveries_missed": expected - delivered,
        "burst_complete": complete,
        "burst_seconds": round(seconds, 4),
        "deliveries_per_s": round(delivered / seconds) if seconds > 0 else None,
        **cpu,
    }


async def measure_steady(publisher: Publisher, recorder: Recorder, subscribers: int, rate: int, duration: int) -> dict:
    events = rate * duration
    await publisher.paced(rate, events)
    complete = await recorder.until(lambda: len(recorder.latencies_ns) >= subscribers * events, STEADY_DRAIN_TIMEOUT)
    latencies = sorted(recorder.latencies_ns)
    if not latencies:
        raise BenchError("no steady-rate event reached any subscriber")
    return {
        "steady_events": events,
        "latency_samples": len(latencies),
        "latency_missed": subscribers * events - len(latencies),
        "steady_complete": complete,
        "p50_ms": round(percentile(latencies, 50) / 1e6, 3),
        "p99_ms": round(percentile(latencies, 99) / 1e6, 3),
        "max_ms": round(latencies[-1] / 1e6, 3),
    }


def bench_channel(label: str) -> str:
    return f"bench.{label}.{uuid.uuid4().hex[:8]}"


async def measure_transport(
    session: aiohttp.ClientSession, server: Server, transport: str, args: argparse.Namespace
) -> dict:
    channel = bench_channel(transport)
    recorder = Recorder()
    publisher = Publisher(session, server, channel)
    async with SubscriberPool(server, recorder) as pool:
        await pool.open(transport, channel, args.subscribers)
        await warm_up(publisher, recorder, args.subscribers)
        burst = await measure_burst(server, publisher, recorder, args.subscribers, args.events)
        steady = await measure_steady(publisher, recorder, args.subscribers, args.rate, args.duration)
    return {"subscribers": args.subscribers, **burst, **steady}


async def measure_idle(server: Server, connections: int) -> dict:
    """RSS growth of the server per idle subscribed WebSocket (after a few connections warm its code paths)."""
    channel = bench_channel("idle")
    recorder = Recorder()
    async with SubscriberPool(server, recorder) as warm:
        await warm.open("ws", channel, IDLE_WARMUP_CONNECTIONS)
    before = await settled_rss(server)
    async with SubscriberPool(server, recorder) as pool:
        await pool.open("ws", channel, connections)
        after = await settled_rss(server)
        recorder.check_connected()
    return {
        "connections": connections,
        "rss_before_kib": round(before / 1024),
        "rss_after_kib": round(after / 1024),
        "kib_per_connection": round((after - before) / 1024 / connections, 2),
    }


def describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"


async def attempt(server: Server, label: str, measure: Callable[[], Awaitable[dict]]) -> dict:
    """Run one measurement; a failure is reported with the server's log tail and recorded, not raised."""
    try:
        if (status := server.process.poll()) is not None:
            raise BenchError(f"{server.name} is no longer running (exit status {status})")
        return await measure()
    except FAILURES as exc:
        return failure(server, label, exc)


def failure(server: Server, label: str, exc: BaseException) -> dict:
    message = describe(exc)
    print(f"\n{server.name} {label} FAILED: {message}", file=sys.stderr)
    print(f"--- last lines of {server.name}'s output ---\n{server.log_tail()}\n---", file=sys.stderr)
    return {"error": message}


async def run_target(session: aiohttp.ClientSession, name: str, args: argparse.Namespace, core: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-", ignore_cleanup_errors=True) as workdir:
        server = STARTERS[name](Path(workdir), core)
        print(f"{name}: starting on {server.base_url}", file=sys.stderr)
        try:
            try:
                await wait_ready(session, server, args.startup_timeout)
                if name == "herald":
                    server.token = await login(session, server)
            except FAILURES as exc:
                return failure(server, "start-up", exc)
            return await measure_target(session, server, args)
        finally:
            stop(server)


async def measure_target(session: aiohttp.ClientSession, server: Server, args: argparse.Namespace) -> dict:
    results = {}
    if args.idle > 0:
        print(f"{server.name}: RSS of {args.idle} idle WebSockets", file=sys.stderr)
        results["idle_ws"] = await attempt(server, "idle", partial(measure_idle, server, args.idle))
    for transport in TRANSPORTS:
        print(f"{server.name}: {args.subscribers} {transport} subscribers", file=sys.stderr)
        measure = partial(measure_transport, session, server, transport, args)
        results[transport] = await attempt(server, transport, measure)
    return results


async def run_all(args: argparse.Namespace, server_core: int | None) -> dict[str, dict]:
    names = TARGETS if args.target == "both" else (args.target,)
    # SIGTERM stops the run as Ctrl-C does: by cancelling it, so that the servers are stopped too.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    async with aiohttp.ClientSession() as session:
        return {name: await run_target(session, name, args, server_core) for name in names}


def failed(targets: dict[str, dict]) -> bool:
    return any("error" in result or any("error" in part for part in result.values()) for result in targets.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fd_limit = raise_fd_limit()
    server_core, loadgen_core = pick_cores()
    factory, loop_name = loop_factory()
    started = datetime.now(UTC)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            targets = runner.run(run_all(args, server_core))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: the servers were stopped, no results written", file=sys.stderr)
        return 130
    results = {
        "started_at": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.now(UTC) - started).total_seconds(), 1),
        "config": vars(args),
        "host": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "server_core": server_core,
            "loadgen_core": loadgen_core,
            "loadgen_loop": loop_name,
            "fd_limit": fd_limit,
        },
        "targets": targets,
        "comparison": comparison(targets),
    }
    path = write_json(results, started)
    print(format_report(results))
    print(f"\nresults written to {path}")
    return 1 if failed(targets) else 0


if __name__ == "__main__":
    sys.exit(main())
