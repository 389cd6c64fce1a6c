"""HTTP throughput through Herald's whole middleware chain, against a bare aiohttp app.

    .venv/bin/python -m bench.http [--duration 4] [--rounds 3] [--connections 64]

Three servers run side by side: the bare app (one process, core 0), Herald with one
worker (core 0) and Herald with two workers (both cores). wrk (Debian's `wrk`) loads
GET /healthz and an authenticated GET /api/me on each, round after round, so every
configuration sees the same machine; the table shows medians and the ratios, and the
server's CPU time per request (psutil, the database left out), which other load on the
machine distorts far less than the rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import NamedTuple

import aiohttp
import psutil

from bench import BenchError
from bench.servers import (
    Server,
    cpu_seconds,
    is_database,
    login,
    pin_to,
    start_bare,
    start_herald,
    stop,
    wait_ready,
)


class Case(NamedTuple):
    label: str
    path: str
    token: bool  # send the bench admin's bearer token
    goal: float  # Herald with one worker, at least this share of the bare app's rate


# Other cases (another kind of credential, another route) are one line each.
CASES: tuple[Case, ...] = (
    Case("/healthz", "/healthz", token=False, goal=0.8),
    Case("/api/me", "/api/me", token=True, goal=0.7),
)
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run (4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every configuration (3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    return parser.parse_args(argv)


def run_wrk(url: str, token: str | None, args: argparse.Namespace, core: int | None) -> tuple[float, int]:
    """Requests per second and requests served in one wrk run."""
    command = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency", url]
    if token:
        command[1:1] = ["-H", f"Authorization: Bearer {token}"]
    result = subprocess.run(
        command, capture_output=True, text=True, check=True, preexec_fn=pin_to(core), timeout=args.duration + 30
    )
    match = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    served = re.search(r"(\d+) requests in", result.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", result.stdout)
    if match is None or served is None:
        raise BenchError(f"unexpected wrk output:\n{result.stdout}")
    if errors:
        raise BenchError(f"{url}: {errors[1]} responses were not 2xx:\n{result.stdout}")
    return float(match[1]), int(served[1])


async def start_all(workdir: Path) -> dict[str, Server]:
    servers = {
        "bare": start_bare(workdir, 0),
        "herald 1 worker": start_herald(workdir / "w1", 0, workers=1, name="herald-1"),
        "herald 2 workers": start_herald(workdir / "w2", {0, 1}, workers=2, name="herald-2"),
    }
    async with aiohttp.ClientSession() as session:
        for server in servers.values():
            await wait_ready(session, server, 90)
            if server.name.startswith("herald"):
                server.token = await login(session, server)
    return servers


def server_cpu(server: Server) -> float:
    """CPU seconds used so far by the server's processes, the database left out."""
    root = psutil.Process(server.process.pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if not is_database(process):
                total += cpu_seconds(process)
    return total


Results = dict[str, dict[str, dict[str, list[float]]]]  # server -> case -> {"rps": [...], "cpu_us": [...]}


def measure(servers: dict[str, Server], args: argparse.Namespace) -> Results:
    results: Results = {name: {case.label: {"rps": [], "cpu_us": []} for case in CASES} for name in servers}
    for round_number in range(1, args.rounds + 1):
        for name, server in servers.items():
            # One-core configurations leave core 1 to wrk; two workers share both cores with it.
            wrk_core = None if "2 workers" in name else 1
            for case in CASES:
                token = server.token if case.token else None
                before = server_cpu(server)
                rps, served = run_wrk(server.url(case.path), token, args, wrk_core)
                cpu_us = 1e6 * (server_cpu(server) - before) / max(served, 1)
                results[name][case.label]["rps"].append(rps)
                results[name][case.label]["cpu_us"].append(cpu_us)
                print(
                    f"round {round_number}: {name:17} {case.label:9} {rps:10,.0f} req/s {cpu_us:6.1f} us CPU/req",
                    file=sys.stderr,
                )
    return results


def report(results: Results) -> dict:
    median = {
        name: {label: {k: statistics.median(v) for k, v in figures.items()} for label, figures in cases.items()}
        for name, cases in results.items()
    }
    names = ("bare", "herald 1 worker", "herald 2 workers")
    print("\nHTTP requests/s (wrk, medians of the rounds) and server CPU per request (load barely moves it)")
    print(
        f"{'case':10} {'bare':>9} {'herald 1w':>10} {'herald 2w':>10} {'1w/bare':>8} {'2w/1w':>7}"
        f" {'CPU us/req bare/1w':>19} {'CPU ratio':>9}  goals"
    )
    summary = {}
    for case in CASES:
        bare, one, two = (median[n][case.label]["rps"] for n in names)
        cpu_bare, cpu_one = (median[n][case.label]["cpu_us"] for n in names[:2])
        ratio, scale, cpu_ratio = one / bare, two / one, cpu_bare / cpu_one
        verdict = f"1w ≥ {case.goal}x bare ({'met' if ratio >= case.goal else 'MISSED'}), 2w ≥ 1.3x 1w "
        verdict += f"({'met' if scale >= 1.3 else 'MISSED'})"
        print(
            f"{case.label:10} {bare:9,.0f} {one:10,.0f} {two:10,.0f} {ratio:7.2f}x {scale:6.2f}x"
            f" {cpu_bare:9.1f} /{cpu_one:7.1f} {cpu_ratio:8.2f}x  {verdict}"
        )
        summary[case.label] = {
            "bare": bare,
            "herald_1": one,
            "herald_2": two,
            "ratio_1w": ratio,
            "scale_2w": scale,
            "cpu_us_bare": cpu_bare,
            "cpu_us_herald_1": cpu_one,
            "cpu_ratio_1w": cpu_ratio,
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench.http needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="herald-bench-http-") as tmp:
        workdir = Path(tmp)
        (workdir / "w1").mkdir()
        (workdir / "w2").mkdir()
        servers: dict[str, Server] = {}
        try:
            servers = asyncio.run(start_all(workdir))
            results = measure(servers, args)
        except BenchError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            for server in servers.values():
                print(f"--- {server.name}\n{server.log_tail()}", file=sys.stderr)
            return 1
        finally:
            for server in servers.values():
                stop(server)
    summary = report(results)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"http-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"raw": results, "summary": summary, "args": vars(args)}, indent=2))
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
