"""The serving process tree: database, migrations, the listening socket, the workers."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import select
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from server.errors import Conflict
from server.identity.permissions import compile_rules, owner_channel_warnings
from server.identity.secrets import load_or_create_secret
from server.identity.users import UserStore, validate_new_user
from server.limits.limiter import RateLimiter
from server.ops import logs
from server.ops.metrics import enable_multiprocess, forget_process
from server.process.worker import run_worker
from server.settings import Settings
from server.storage import db
from server.storage.embedded_pg import EmbeddedPostgres, mask_url

T = TypeVar("T")

EARLY_DEATH = 5.0  # a worker dying sooner than this after start counts towards the backoff
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 10.0
READY_TIMEOUT = 60.0
STOP_GRACE = 5.0
PR_SET_PDEATHSIG = 1

log = logging.getLogger("herald.supervisor")


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[tuple[Settings, str]]:
    """Settings pointing at a usable database, and how to describe it in the logs.

    With no URL, a private PostgreSQL starts in data_dir and is stopped on the way out.
    """
    if settings.database.url:
        yield settings, f"external {mask_url(settings.database.url)}"
        return
    embedded = EmbeddedPostgres(settings.database.data_dir)
    try:
        url = asyncio.run(embedded.ensure_database())
        yield settings.replace("database", url=url), f"embedded PostgreSQL in {embedded.data_dir}"
    finally:
        embedded.stop()


async def with_user_store(settings: Settings, action: Callable[[UserStore], Awaitable[T]]) -> T:
    """Run one action against the users table outside the app (CLI, first start)."""
    await db.migrate(settings.database.url, schema=settings.database.schema)
    pool = await db.create_pool(settings.database.url, settings.database.schema, min_size=1, max_size=2)
    try:
        return await action(UserStore(pool, settings.auth.bcrypt_rounds))
    finally:
        await pool.close()


FIRST_ADMIN = "admin"


def announce_first_admin(username: str, password: str) -> None:
    """The generated password, once, on stderr only: one JSON line like every other there
    (PROTOCOL §7), its message framed so it stands out, but written directly, not through
    logging, whose handlers may ship lines elsewhere; a start that finds a user never shows it."""
    banner = "*" * 12
    message = (
        f"{banner} first start: created the admin user {username!r} with password {password!r};"
        f" it is shown only this once: sign in and replace it (README, First start) {banner}"
    )
    record = logging.makeLogRecord({"name": "herald.first_start", "levelno": logging.WARNING, "msg": message})
    record.levelname = "WARNING"
    print(logs.JsonFormatter().format(record), file=sys.stderr, flush=True)


async def bootstrap_admin(
    users: UserStore, environ: Mapping[str, str], announce: Callable[[str, str], None] = announce_first_admin
) -> None:
    """First start, no user yet: HERALD_ADMIN_USERNAME / _PASSWORD create an admin; with neither
    set, the admin `admin` gets a random password, announced once (so a newcomer can sign in)."""
    username, password = environ.get("HERALD_ADMIN_USERNAME"), environ.get("HERALD_ADMIN_PASSWORD")
    generated = not username and not password
    if generated:
        username, password = FIRST_ADMIN, secrets.token_urlsafe(18)
    if not username or not password or await users.count() > 0:
        return
    username, password, roles = validate_new_user(username, password, ["admin"])
    try:
        await users.create(username, password, roles)
    except Conflict:  # another instance sharing the database created it first
        return
    log.info("created the first admin %s", username)
    if generated:
        announce(username, password)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind once, before any worker exists, so every worker serves the same socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def with_shared_secrets(settings: Settings) -> Settings:
    """Resolve generated secrets once, so every worker signs and decrypts with the same keys."""
    auth = settings.auth
    return settings.replace(
        "auth",
        jwt_secret=auth.jwt_secret or load_or_create_secret(auth.secrets_dir, "jwt_secret"),
        session_secret=auth.session_secret or load_or_create_secret(auth.secrets_dir, "session_secret"),
    )


def serve(settings: Settings, reload: Callable[[], Settings] | None = None) -> int:
    with database(settings) as (settings, description), tempfile.TemporaryDirectory(prefix="herald-metrics-") as tmp:
        asyncio.run(with_user_store(settings, lambda users: bootstrap_admin(users, os.environ)))
        settings = with_shared_secrets(settings)
        sock = bind_socket(settings.server.host, settings.server.port)
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        count = settings.server.worker_count
        log.info(
            "Herald listening on %s with %d worker(s), database: %s",
            url,
            count,
            description,
            extra={"url": url, "workers": count, "database": description},
        )
        for warning in owner_channel_warnings(compile_rules(settings.channels)):
            log.warning(warning)
        enable_multiprocess(tmp)
        fixed = settings

        def reloaded() -> Settings:
            """SIGHUP: settings read again; the socket, database and secrets stay as they are."""
            fresh = reload() if reload else fixed
            kept = fresh.replace("server", host=fixed.server.host, port=fixed.server.port)
            return with_shared_secrets(kept.replace("database", url=fixed.database.url))

        Supervisor(settings, sock, count, RateLimiter(), reloaded).run()
    log.info("stopped")
    return 0


@dataclass
class Worker:
    pid: int
    slot: int
    ready_fd: int
    started: float
    retiring: bool = False


class Supervisor:
    """Forks the workers, replaces the ones that die, drains on SIGTERM, rolls them on SIGHUP."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

    def __init__(
        self, settings: Settings, sock: socket.socket, count: int, limiter: RateLimiter, reload: Callable[[], Settings]
    ) -> None:
        self.settings = settings
        self.sock = sock
        self.count = count
        self.limiter = limiter
        self.reload = reload
        self.workers: dict[int, Worker] = {}
        self.failures = 0  # consecutive early deaths, for the restart backoff
        self.restart_at: dict[int, float] = {}  # slot -> when to start its replacement

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        for slot in range(self.count):
            self.spawn(slot)
        try:
            return self.supervise()
        except BaseException:
            log.exception("supervisor failed; stopping the workers")
            self.stop()
            raise

    def supervise(self) -> int:
        while True:
            info = signal.sigtimedwait(self.SIGNALS, 0.2)
            self.reap()
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                return self.stop()
            if info is not None and info.si_signo == signal.SIGHUP:
                self.roll()
            self.restart_due()

    def spawn(self, slot: int) -> Worker:
        ready_read, ready_write = os.pipe()
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(ready_read)
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                for sig in self.SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the supervisor's business
                drain_when_orphaned(supervisor)
                logs.worker_id = str(slot)
                run_worker(self.settings, self.sock, limiter=self.limiter, on_ready=lambda: os.write(ready_write, b"1"))
                code = 0
            except BaseException:
                log.exception("worker failed")
            finally:
                os._exit(code)  # never run the supervisor's atexit hooks (the embedded database's)
        os.close(ready_write)
        worker = Worker(pid, slot, ready_read, time.monotonic())
        self.workers[pid] = worker
        return worker

    def reap(self) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            os.close(worker.ready_fd)
            forget_process(pid)
            self.limiter.connections.forget_process(pid)
            if worker.retiring:
                continue
            lived = time.monotonic() - worker.started
            self.failures = self.failures + 1 if lived < EARLY_DEATH else 0
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures - 1)) if self.failures else 0.0
            log.warning(
                "worker %d (pid %d) exited with status %d; replacing it in %.1fs",
                worker.slot,
                pid,
                os.waitstatus_to_exitcode(status),
                delay,
            )
            self.restart_at[worker.slot] = time.monotonic() + delay

    def restart_due(self) -> None:
        now = time.monotonic()
        for slot, when in list(self.restart_at.items()):
            if when <= now:
                del self.restart_at[slot]
                self.spawn(slot)

    def roll(self) -> None:
        """Replace each worker by a fresh one, starting the new before stopping the old."""
        try:
            self.settings = self.reload()
        except Exception as exc:  # a bad settings file must not take the server down
            log.error("SIGHUP: settings not reloaded: %s", exc)
        log.info("SIGHUP: replacing workers one by one")
        for old in [w for w in self.workers.values() if not w.retiring]:
            if old.pid not in self.workers:
                continue  # it died during the roll and was reaped: restart_due() replaces it
            new = self.spawn(old.slot)
            if wait_ready(new.ready_fd, READY_TIMEOUT):
                retire(old, signal.SIGTERM)
            else:
                log.error("SIGHUP: a new worker did not start; keeping the old one")
                retire(new, signal.SIGKILL)
            self.reap()

    def stop(self) -> int:
        log.info("draining %d worker(s)", len(self.workers))
        for worker in self.workers.values():
            retire(worker, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.server.shutdown_timeout + STOP_GRACE
        while self.workers and time.monotonic() < deadline:
            signal.sigtimedwait([signal.SIGCHLD], 0.1)
            self.reap()
        for worker in self.workers.values():
            log.error("worker pid %d did not drain in time; killing it", worker.pid)
            retire(worker, signal.SIGKILL)
        while self.workers:
            signal.sigtimedwait([signal.SIGCHLD], 0.1)
            self.reap()
        self.sock.close()
        return 0


def drain_when_orphaned(parent: int) -> None:
    """Linux: SIGTERM this worker if the supervisor dies (even by SIGKILL), so none lingers."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def retire(worker: Worker, sig: int) -> None:
    worker.retiring = True
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker.pid, sig)


def wait_ready(fd: int, timeout: float) -> bool:
    readable, _, _ = select.select([fd], [], [], timeout)
    return bool(readable) and os.read(fd, 1) == b"1"
