"""Real `run.py serve` process trees for the fault tests: start, wait, inspect, kill.

Each Herald runs in its own session (process group), so a test can always SIGKILL the
supervisor and every worker it forked, whatever state they are in.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]
ADMIN, ADMIN_PASSWORD = "root", "admin password 1"
PUBLISHER, PUBLISHER_PASSWORD = "pub", "publisher password 1"
CHANNEL_RULES = '[[channels]]\npattern = "*"\nsubscribe = ["anonymous"]\npublish = ["publisher"]\n'
GENEROUS_LIMITS = {"rate": 100000, "burst": 100000, "login_rate": 100000, "login_ip_rate": 100000}
STOPPED_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_settings(
    path: Path, limits: dict[str, Any] | None = None, extra: str = "", rules: str = CHANNEL_RULES
) -> Path:
    """`extra`: more TOML (arrays of tables such as [[auth.issuers]]) after the channel rules."""
    lines = ["[database]", "pool_size = 4", "[limits]"]
    lines += [f"{key} = {value}" for key, value in {**GENEROUS_LIMITS, **(limits or {})}.items()]
    path.write_text("\n".join(lines) + "\n" + rules + extra)
    return path


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without Herald's settings or a metrics dir, plus `extra`."""
    drop = ("HERALD_", "DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


@dataclass
class Herald:
    """One `run.py serve` process tree on a port of its own."""

    proc: subprocess.Popen[bytes]
    port: int
    workers: int
    log_path: Path
    session: aiohttp.ClientSession | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls,
        directory: Path,
        database_url: str,
        *,
        workers: int = 2,
        name: str = "herald",
        secrets_dir: Path | None = None,
        limits: dict[str, Any] | None = None,
        rules: str = CHANNEL_RULES,
        env: dict[str, str] | None = None,
        extra_settings: str = "",
    ) -> Herald:
        """`database_url` "" means the embedded PostgreSQL (pass HERALD_DATABASE_DATA_DIR in `env`)."""
        directory.mkdir(parents=True, exist_ok=True)
        settings = write_settings(directory / f"{name}.toml", limits, extra_settings, rules)
        port = free_port()
        env = child_env(
            DATABASE_URL=database_url,
            HERALD_ADMIN_USERNAME=ADMIN,
            HERALD_ADMIN_PASSWORD=ADMIN_PASSWORD,
            HERALD_AUTH_BCRYPT_ROUNDS="4",
            HERALD_AUTH_SECRETS_DIR=str(secrets_dir or directory / "secrets"),
            HERALD_SERVER_SHUTDOWN_TIMEOUT="5",
            HERALD_REALTIME_SSE_PING="0.5",
            **(env or {}),
        )
        log_path = directory / f"{name}.stderr.log"
        command = [sys.executable, "run.py", "serve", "--settings", str(settings)]
        command += ["--port", str(port), "--workers", str(workers)]
        with log_path.open("wb") as stderr:
            proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        return cls(proc, port, workers, log_path)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str) -> str:
        return self.base + path

    # -- inspection -------------------------------------------------------------------

    def worker_pids(self) -> set[int]:
        """The supervisor's live children (a reaped or zombie worker is not one)."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return set()
        pids = set()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE:
                    pids.add(child.pid)
        return pids

    def worker_holding(self, client_port: int) -> int | None:
        """Which worker pid holds the server side of the connection from client_port."""
        for pid in self.worker_pids():
            with contextlib.suppress(psutil.NoSuchProcess):
                for conn in psutil.Process(pid).net_connections(kind="tcp"):
                    if conn.raddr and conn.raddr.port == client_port and conn.laddr.port == self.port:
                        return pid
        return None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_entries(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                entries.append(orjson.loads(line))
        return entries

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"run.py exited with {self.proc.returncode}:\n{self.log_tail()}")

    # -- life cycle -------------------------------------------------------------------

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Every worker has been forked and has itself answered GET /readyz with 200."""
        answered: set[int] = set()

        async def ready() -> bool:
            self.check_running()
            with contextlib.suppress(OSError, TimeoutError):
                if (pid := await asyncio.wait_for(self.probe_ready(), 2)) is not None:
                    answered.add(pid)
            workers = self.worker_pids()
            return len(workers) == self.workers and workers <= answered

        await wait_for(ready, timeout=timeout, interval=0.02)

    async def probe_ready(self) -> int | None:
        """GET /readyz on a keep-alive connection; if 200, the pid of the worker that answered.

        While the connection stays open after the answer, psutil shows who holds it.
        """
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200 "):
                return None
            return self.worker_holding(writer.get_extra_info("sockname")[1])
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"run.py still running {timeout}s later:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        return code

    def kill(self) -> None:
        """SIGKILL the whole tree: the supervisor's process group, and any worker left over."""
        pids = self.worker_pids()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOPPED_TIMEOUT)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(session: aiohttp.ClientSession, base: str, username: str, password: str) -> str:
    async with session.post(f"{base}/api/auth/login", json={"username": username, "password": password}) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["access_token"]


@dataclass
class Tokens:
    admin: str
    publisher: str


async def make_users(base: str) -> Tokens:
    """The bootstrap admin's token, and a publisher created through the admin API."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        admin = await login(session, base, ADMIN, ADMIN_PASSWORD)
        body = {"username": PUBLISHER, "password": PUBLISHER_PASSWORD, "roles": ["publisher"]}
        async with session.post(f"{base}/api/users", json=body, headers=bearer(admin)) as resp:
            assert resp.status == 201, await resp.text()
        publisher = await login(session, base, PUBLISHER, PUBLISHER_PASSWORD)
    return Tokens(admin, publisher)


async def history(session: aiohttp.ClientSession, base: str, channel: str) -> list[dict[str, Any]]:
    """Every event the channel holds, oldest first."""
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        async with session.get(f"{base}/api/channels/{channel}/events?after={after}&limit=1000") as resp:
            assert resp.status == 200, await resp.text()
            page = await resp.json()
        events += page["items"]
        if page["next"] is None:
            return events
        after = page["next"]
