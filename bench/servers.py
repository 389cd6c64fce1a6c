"""The servers under test: start them pinned to the server core, wait, log in, measure RSS, stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import aiohttp
import psutil

from bench import BenchError

REPO_ROOT = Path(__file__).resolve().parent.parent
ADMIN_USERNAME = "bench"
ADMIN_PASSWORD = "bench-password-123"
STOP_TIMEOUT = 30.0
READY_POLL_INTERVAL = 0.2
RSS_SAMPLE_INTERVAL = 0.25
RSS_SAMPLES = 20
RSS_STABLE_BYTES = 256 * 1024
CPU_MIN_WINDOW = 0.5
MACHINE_NOT_BUSY = {"idle", "iowait", "guest", "guest_nice"}  # guest time is already counted in user
LOG_TAIL_LINES = 25
ACCESS_LOG_MARK = '"logger":"herald.access"'

HERALD_SETTINGS = """\
[auth]
secrets_dir = {secrets_dir}

[limits]
rate = 1000000
burst = 1000000
body_bytes = 65536

[realtime]
outbound_buffer = 1048576

[[channels]]
pattern = "*"
subscribe = ["anonymous"]
publish = ["publisher"]
"""


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen
    log_path: Path
    token: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def log_tail(self) -> str:
        """The server's last output lines; access-log lines are left out, they would drown the errors."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no log: {exc})"
        lines = [line for line in lines if ACCESS_LOG_MARK not in line]
        return "\n".join(lines[-LOG_TAIL_LINES:]) or "(nothing but access logs)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pin_to(cores: int | set[int] | None) -> Callable[[], None] | None:
    """A preexec_fn that moves the child to `cores` (None: leave it where it is)."""
    if cores is None:
        return None
    return partial(os.sched_setaffinity, 0, {cores} if isinstance(cores, int) else cores)


def spawn(
    name: str, port: int, args: list[str], env: dict[str, str], workdir: Path, core: int | set[int] | None
) -> Server:
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=pin_to(core),
        )
    return Server(name, port, process, log_path)


def start_naive(workdir: Path, core: int | None) -> Server:
    port = free_port()
    args = [sys.executable, "-m", "bench.naive_server", "--port", str(port)]
    return spawn("naive", port, args, dict(os.environ), workdir, core)


def herald_env(workdir: Path) -> dict[str, str]:
    """The caller's environment without HERALD_* overrides, plus the bench admin; DATABASE_URL passes through."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HERALD_")}
    env["HERALD_ADMIN_USERNAME"] = ADMIN_USERNAME
    env["HERALD_ADMIN_PASSWORD"] = ADMIN_PASSWORD
    if not env.get("DATABASE_URL"):
        env["HERALD_DATABASE_DATA_DIR"] = str(workdir / "pgdata")
    return env


def start_herald(
    workdir: Path, core: int | set[int] | None, workers: int = 1, name: str = "herald", extra_settings: str = ""
) -> Server:
    """`extra_settings`: more TOML after the defaults (arrays of tables such as [[auth.issuers]])."""
    settings = workdir / "settings.toml"
    settings.write_text(HERALD_SETTINGS.format(secrets_dir=json.dumps(str(workdir / "secrets"))) + extra_settings)
    port = free_port()
    args = [sys.executable, "run.py", "serve", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--workers", str(workers), "--settings", str(settings)]
    return spawn(name, port, args, herald_env(workdir), workdir, core)


def start_bare(workdir: Path, core: int | set[int] | None) -> Server:
    port = free_port()
    args = [sys.executable, "-m", "bench.bare_server", "--port", str(port)]
    return spawn("bare", port, args, dict(os.environ), workdir, core)


STARTERS = {"naive": start_naive, "herald": start_herald}


async def wait_ready(session: aiohttp.ClientSession, server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (status := server.process.poll()) is not None:
            raise BenchError(f"{server.name} exited with status {status} before it was ready")
        with suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(server.url("/readyz"), timeout=aiohttp.ClientTimeout(total=2)) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(READY_POLL_INTERVAL)
    raise BenchError(f"{server.name}: GET /readyz did not answer 200 within {timeout:g} s")


async def login(session: aiohttp.ClientSession, server: Server) -> str:
    body = {"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD}
    timeout = aiohttp.ClientTimeout(total=30)
    async with session.post(server.url("/api/auth/login"), json=body, timeout=timeout) as response:
        if response.status != 200:
            text = await response.text()
            raise BenchError(f"{server.name}: login as {ADMIN_USERNAME!r} answered {response.status}: {text[:300]}")
        return (await response.json())["access_token"]


def is_database(process: psutil.Process) -> bool:
    return process.name().startswith(("postgres", "postmaster"))


def pin_database(server: Server, cores: set[int]) -> int:
    """Move the server's embedded PostgreSQL (the postmaster, whose new backends inherit it,
    and the processes it runs already) onto `cores`; returns how many processes moved.
    pg_ctl detaches the postmaster from Herald, so it is found by its data directory."""
    pid_file = server.log_path.parent / "pgdata" / "postmaster.pid"
    if not pid_file.is_file():
        return 0  # DATABASE_URL: not ours to move
    postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
    moved = 0
    for process in [postmaster, *postmaster.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            process.cpu_affinity(sorted(cores))
            moved += 1
    return moved


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


class CpuSnapshot(NamedTuple):
    server: float  # CPU seconds of the server and its descendants (the database too, if it is one)
    loadgen: float  # of this process
    machine: float  # busy CPU seconds of the whole machine, all cores
    clock: float


def machine_busy_seconds() -> float:
    times = psutil.cpu_times()._asdict()
    return sum(value for key, value in times.items() if key not in MACHINE_NOT_BUSY)


def cpu_snapshot(server: Server) -> CpuSnapshot:
    root = psutil.Process(server.process.pid)
    busy = 0.0
    for process in [root, *root.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            busy += cpu_seconds(process)
    return CpuSnapshot(busy, cpu_seconds(psutil.Process()), machine_busy_seconds(), time.monotonic())


def cpu_usage(before: CpuSnapshot, after: CpuSnapshot) -> dict:
    """CPU use between two snapshots in percent of one core; None over too short a time for clock ticks.

    `other_cpu_pct` is what the rest of the machine used meanwhile (other processes, unattributed kernel
    work): a high figure means the measurement shared its cores.
    """
    elapsed = after.clock - before.clock
    if elapsed < CPU_MIN_WINDOW:
        return dict.fromkeys(("server_cpu_pct", "loadgen_cpu_pct", "other_cpu_pct"))
    server, loadgen = after.server - before.server, after.loadgen - before.loadgen
    other = after.machine - before.machine - server - loadgen
    return {
        "server_cpu_pct": round(100 * server / elapsed),
        "loadgen_cpu_pct": round(100 * loadgen / elapsed),
        "other_cpu_pct": max(0, round(100 * other / elapsed)),
    }


def server_rss(server: Server) -> int:
    """RSS in bytes of the server process and its descendants, the database excluded."""
    root = psutil.Process(server.process.pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if not is_database(process):
                total += process.memory_info().rss
    return total


async def settled_rss(server: Server) -> int:
    """The server's RSS once two samples in a row agree (at most RSS_SAMPLES samples)."""
    previous = server_rss(server)
    for _ in range(RSS_SAMPLES):
        await asyncio.sleep(RSS_SAMPLE_INTERVAL)
        current = server_rss(server)
        if abs(current - previous) <= RSS_STABLE_BYTES:
            return current
        previous = current
    return previous


def reap(processes: list[psutil.Process]) -> None:
    """Wait for processes the server started to end; terminate, then kill, any it left behind."""
    _, alive = psutil.wait_procs(processes, timeout=10)
    for end in (psutil.Process.terminate, psutil.Process.kill):
        if not alive:
            return
        for process in alive:
            with suppress(psutil.NoSuchProcess):
                end(process)
        _, alive = psutil.wait_procs(alive, timeout=5)


def stop(server: Server) -> None:
    process = server.process
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    reap(descendants)
