"""The zero-setup default: a private PostgreSQL (pgserver) when no database URL is set."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

log = logging.getLogger("herald.embedded_pg")

DATABASE = "herald"


class EmbeddedPostgresError(Exception):
    """The embedded PostgreSQL could not be started or reached: str() is one line naming the
    data dir and the cause (run.py prints it and exits 2, as for a bad setting)."""


class EmbeddedPostgres:
    """A PostgreSQL server living in data_dir, reached over a Unix socket only.

    It is stopped by stop() or, failing that, at interpreter exit (pgserver's atexit).
    """

    def __init__(self, data_dir: str | Path) -> None:
        path = Path(data_dir).expanduser().resolve()
        self.data_dir = path
        with pgserver_messages() as messages:
            try:
                with warnings.catch_warnings():
                    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI).
                    warnings.simplefilter("ignore")
                    import pgserver
                    from pgserver import _commands

                self._commands = _commands
                path.parent.mkdir(parents=True, exist_ok=True)
                with first_start_lock(path):
                    # Whether this process starts the cluster (so stop() must stop it), or finds it running.
                    self.started_here = not postmaster_running(path)
                    self._server: Any = pgserver.get_server(path, cleanup_mode="stop")
            except Exception as exc:
                raise EmbeddedPostgresError(f"embedded PostgreSQL in {path}: {failure_cause(exc, messages)}") from None

    def url(self, database: str = DATABASE) -> str:
        return self._server.get_uri(database)

    async def ensure_database(self, database: str = DATABASE) -> str:
        try:
            conn = await asyncpg.connect(self.url("postgres"))
            try:
                exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
                if not exists:
                    await conn.execute(f'CREATE DATABASE "{database}"')
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise EmbeddedPostgresError(f"embedded PostgreSQL in {self.data_dir}: {exc}") from None
        return self.url(database)

    def pg_ctl(self, *args: str) -> None:
        """Run pg_ctl on this cluster (as pgserver's system user when we are root)."""
        self._commands.pg_ctl(list(args), pgdata=self.data_dir, user=self._server.system_user, timeout=60)

    def stop(self) -> None:
        """Stop the cluster if this process started it and no other process still uses it.

        pgserver stops only the postmaster it started: one restarted from outside since
        (pg_ctl restart, a crash and recovery) outlived Herald. So whatever runs in data_dir
        then is stopped with pg_ctl.
        """
        others = [pid for pid in self._server.global_process_id_list.get() if pid != os.getpid()]
        last = not any(psutil.pid_exists(pid) for pid in others)
        self._server.cleanup()
        if self.started_here and last and postmaster_running(self.data_dir):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.pg_ctl("-w", "-m", "fast", "stop")


def postmaster_running(data_dir: Path) -> bool:
    """Whether postmaster.pid in data_dir names a live process."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    return psutil.pid_exists(pid)


@contextlib.contextmanager
def first_start_lock(data_dir: Path) -> Iterator[None]:
    """One process at a time creates pgserver's system user (as root), runs initdb and starts
    the cluster: two instances starting at once on a fresh machine both ran useradd and
    initdb, and one failed with a traceback. A lock file beside data_dir serialises them."""
    with open(data_dir.with_name(f"{data_dir.name}.lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process starting the embedded PostgreSQL in %s", data_dir)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def pgserver_messages() -> Iterator[list[str]]:
    """pgserver's own log lines (commands, multi-line server logs) kept, not printed: on failure
    the cause is taken from them, and the operator gets one line."""
    logger = logging.getLogger("pgserver")
    handler = _Collect()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def failure_cause(exc: BaseException, messages: list[str]) -> str:
    """The most telling line: a failed command's last stderr line, else the exception."""
    if isinstance(exc, subprocess.CalledProcessError):
        command = Path(str(exc.cmd[0] if isinstance(exc.cmd, list | tuple) else exc.cmd).split()[0]).name
        detail = ""
        for message in reversed(messages):
            if "stderr:" in message:
                lines = [line.strip() for line in message.split("stderr:", 1)[1].split("\n")]
                lines = [line for line in lines if line and line != "---"]
                errors = [line for line in lines if "error" in line.lower() or "FATAL" in line]
                detail = (errors or lines or [""])[-1]
                if detail:
                    break
        return f"{command} exited with status {exc.returncode}" + (f": {detail}" if detail else "")
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def mask_url(url: str) -> str:
    """The URL with any password (in the authority or the query) replaced, for logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = re.sub(r"(?i)(^|&)(password|sslpassword)=[^&]*", r"\1\2=***", parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # urlunsplit would drop the empty authority of postgresql:///db
    return urlunsplit(parts._replace(netloc=netloc, query=query))
