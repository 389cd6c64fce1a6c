"""Instructions per request, which other load on a shared machine does not move: each server
runs under valgrind's callgrind, which counts the instructions it executes.

    .venv/bin/python -m bench.instructions [--requests 1000] [--connections 16]

Servers: the bare aiohttp app and Herald with one in-process worker (bench.profile_http
--serve: the bench's settings and its own embedded PostgreSQL). Paths: /healthz and an
authenticated /api/me. Each server runs under a small wrapper: SIGUSR1 zeroes callgrind's
counters and SIGUSR2 dumps them (valgrind's client requests, from a helper compiled here
with gcc), so exactly the requests sent in between are counted, after a warm-up. A rate
ratio (bench.http) of r on a saturated core means Herald does about 1/r of the bare app's
work per request; the instruction ratio bare/herald is that figure without the noise.
Needs valgrind, its headers (callgrind.h) and gcc.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import glob
import os
import re
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.servers import ADMIN_PASSWORD, ADMIN_USERNAME, REPO_ROOT, free_port

PATHS = ("/healthz", "/api/me")
HELPER = r"""
#include <valgrind/callgrind.h>
void herald_zero(void) { CALLGRIND_ZERO_STATS; }
void herald_dump(void) { CALLGRIND_DUMP_STATS; }
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests counted per path (1000)")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections (16)")
    parser.add_argument("--repeat", type=int, default=2, help="windows per path; the least is shown (2)")
    parser.add_argument("--only", choices=("bare", "herald"), help="measure one server only")
    parser.add_argument("--no-chain", action="store_true", help="Herald without its front door")
    return parser.parse_args(argv)


def wrapped(helper: str, module: str, *args: str) -> None:
    """In the server process: signals for the helper, then the server module as __main__."""
    lib = ctypes.CDLL(helper)
    signal.signal(signal.SIGUSR1, lambda *_: (lib.herald_zero(), print("zeroed", flush=True)))
    signal.signal(signal.SIGUSR2, lambda *_: (lib.herald_dump(), print("dumped", flush=True)))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


async def load(url: str, token: str | None, requests: int, connections: int) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as session:

        async def one_connection(count: int) -> None:
            for _ in range(count):
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise SystemExit(f"{url} answered {resp.status}")

        await asyncio.gather(*(one_connection(requests // connections) for _ in range(connections)))


async def wait_up(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=60)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.5)
    raise SystemExit(f"{url} did not come up within {timeout} s")


async def login(base: str) -> str:
    body = {"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD}
    timeout = aiohttp.ClientTimeout(total=600)
    url = f"{base}/api/auth/login"
    async with aiohttp.ClientSession() as session, session.post(url, json=body, timeout=timeout) as r:
        return (await r.json())["access_token"]


def dumps(out_dir: str) -> set[str]:
    return set(glob.glob(os.path.join(out_dir, "callgrind.out.*")))


def instructions_in(path: str) -> int:
    match = re.search(r"^(?:summary|totals): (\d+)", Path(path).read_text(errors="replace"), re.M)
    return int(match[1]) if match else 0


def wait_line(log: Path, text: str, count: int, timeout: float = 300) -> None:
    """Until the server printed `text` `count` times (its signal handler ran)."""
    deadline = time.monotonic() + timeout
    while log.read_text().count(text) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"the server did not print {text!r}:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)


def measure(name: str, command: list[str], helper: str, args: argparse.Namespace, out_dir: str) -> dict[str, float]:
    port = free_port()
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/callgrind.out.%p"]
    wrapper = [sys.executable, "-m", "bench.instructions", "--wrap", helper]
    log = Path(out_dir) / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*valgrind, *wrapper, *command, str(port)], cwd=REPO_ROOT, stdout=out, stderr=subprocess.DEVNULL
        )
    base = f"http://127.0.0.1:{port}"
    figures = {}
    try:
        asyncio.run(wait_up(f"{base}/healthz", 900))
        stripped = name == "herald" and args.no_chain  # no auth layer: no /api/me
        token = asyncio.run(login(base)) if name != "bare" and not stripped else None
        windows = 0
        paths = ("/healthz",) if stripped else PATHS
        for _ in range(args.repeat):  # the first window can hold one-off work (caches, lazy imports)
            for path in paths:
                asyncio.run(load(base + path, token, 100, 4))  # warm-up, not counted
                windows += 1
                proc.send_signal(signal.SIGUSR1)
                wait_line(log, "zeroed", windows)
                before = dumps(out_dir)
                asyncio.run(load(base + path, token, args.requests, args.connections))
                proc.send_signal(signal.SIGUSR2)
                wait_line(log, "dumped", windows)
                counted = sum(instructions_in(p) for p in dumps(out_dir) - before) / args.requests
                figures[path] = min(counted, figures.get(path, counted))
                print(f"{name:7} {path:9} {counted:12,.0f} instructions per request", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=600)
    return figures


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--wrap"]:
        wrapped(argv[1], *argv[2:])
        return 0
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="herald-callgrind-") as out_dir:
        helper = os.path.join(out_dir, "libheraldcg.so")
        source = os.path.join(out_dir, "helper.c")
        Path(source).write_text(HELPER)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", helper, source], check=True)
        experiment = ["--no-chain"] if args.no_chain else []
        servers = {
            "bare": ["bench.bare_server", "--port"],
            "herald": ["bench.profile_http", *experiment, "--serve"],
        }
        results = {
            name: measure(name, command, helper, args, out_dir)
            for name, command in servers.items()
            if args.only in (None, name)
        }
    print("\nInstructions per request (callgrind; other load on the machine does not change them)")
    print(f"{'path':10} {'bare':>12} {'herald':>12} {'bare/herald':>12}")
    for path in PATHS:
        bare, herald = (results.get(name, {}).get(path, float("nan")) for name in ("bare", "herald"))
        if herald != herald:  # nan: not measured
            continue
        print(f"{path:10} {bare:12,.0f} {herald:12,.0f} {bare / herald:11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
