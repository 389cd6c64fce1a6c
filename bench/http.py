"""HTTP throughput through Herald's whole middleware chain, against a bare aiohttp app.

    .venv/bin/python -m bench.http [--duration 4] [--rounds 3] [--connections 64]

Three servers run side by side: the bare app (one process, core 0), Herald with one
worker (core 0) and Herald with two workers (both cores). wrk (Debian's `wrk`) loads
GET /healthz and an authenticated GET /api/me on each, round after round, so every
configuration sees the same machine; the table shows medians and the ratios.
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
from pathlib import Path

import aiohttp

from bench import BenchError
from bench.servers import Server, login, pin_to, start_bare, start_herald, stop, wait_ready

PATHS = ("/healthz", "/api/me")
GOALS = {"/healthz": 0.85, "/api/me": 0.7}
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run (4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every configuration (3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    return parser.parse_args(argv)


def run_wrk(url: str, token: str | None, args: argparse.Namespace, core: int | None) -> float:
    command = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency", url]
    if token:
        command[1:1] = ["-H", f"Authorization: Bearer {token}"]
    result = subprocess.run(
        command, capture_output=True, text=True, check=True, preexec_fn=pin_to(core), timeout=args.duration + 30
    )
    match = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", result.stdout)
    if match is None:
        raise BenchError(f"unexpected wrk output:\n{result.stdout}")
    if errors:
        raise BenchError(f"{url}: {errors[1]} responses were not 2xx:\n{result.stdout}")
    return float(match[1])


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


def measure(servers: dict[str, Server], args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {name: {p: [] for p in PATHS} for name in servers}
    for round_number in range(1, args.rounds + 1):
        for name, server in servers.items():
            # One-core configurations leave core 1 to wrk; two workers share both cores with it.
            wrk_core = None if "2 workers" in name else 1
            for path in PATHS:
                token = server.token if path == "/api/me" else None
                rps = run_wrk(server.url(path), token, args, wrk_core)
                results[name][path].append(rps)
                print(f"round {round_number}: {name:17} {path:9} {rps:10,.0f} req/s", file=sys.stderr)
    return results


def report(results: dict[str, dict[str, list[float]]]) -> dict:
    median = {name: {p: statistics.median(v) for p, v in paths.items()} for name, paths in results.items()}
    print("\nHTTP requests/s (wrk, medians of the rounds)")
    print(f"{'path':10} {'bare':>10} {'herald 1w':>10} {'herald 2w':>10} {'1w/bare':>8} {'2w/1w':>7}  goals")
    summary = {}
    for path in PATHS:
        bare, one, two = (median[n][path] for n in ("bare", "herald 1 worker", "herald 2 workers"))
        ratio, scale = one / bare, two / one
        goal = GOALS[path]
        verdict = f"1w ≥ {goal}x bare ({'met' if ratio >= goal else 'MISSED'}), 2w ≥ 1.3x 1w "
        verdict += f"({'met' if scale >= 1.3 else 'MISSED'})"
        print(f"{path:10} {bare:10,.0f} {one:10,.0f} {two:10,.0f} {ratio:7.2f}x {scale:6.2f}x  {verdict}")
        summary[path] = {"bare": bare, "herald_1": one, "herald_2": two, "ratio_1w": ratio, "scale_2w": scale}
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
