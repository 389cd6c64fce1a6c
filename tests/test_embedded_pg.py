"""The embedded PostgreSQL's life with Herald (issue 10): one clear line on failure, a lock
around the first start, and no cluster left running after Herald stops."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from server.storage.embedded_pg import postmaster_running
from tests.conftest import wait_for
from tests.procs import ROOT, Herald, child_env

START_TIMEOUT = 120.0  # initdb and a first start on a loaded 2-core machine


@pytest.fixture
def pg_parent() -> Iterator[Path]:
    """Not under pytest's tmp dir (see tests/conftest.py: pgserver opens the parents to its user)."""
    parent = Path(tempfile.mkdtemp(prefix="herald-pg-"))
    parent.chmod(0o755)
    yield parent
    data_dir = parent / "pgdata"
    if postmaster_running(data_dir):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            pg_ctl(data_dir, "-w", "-m", "immediate", "stop")
    shutil.rmtree(parent, ignore_errors=True)


def pg_ctl(data_dir: Path, *args: str) -> None:
    """pg_ctl on that cluster, from outside Herald (as pgserver's system user when root)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, at import, without XDG_RUNTIME_DIR
        from pgserver import _commands

    user = "pgserver" if os.geteuid() == 0 else None
    _commands.pg_ctl(list(args), pgdata=data_dir, user=user, timeout=60)


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


def run_py(*args: str, data_dir: Path, **kwargs) -> subprocess.Popen[str]:
    env = child_env(HERALD_DATABASE_DATA_DIR=str(data_dir), HERALD_AUTH_BCRYPT_ROUNDS="4")
    return subprocess.Popen(
        [sys.executable, "run.py", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_an_embedded_postgresql_failure_is_one_line_naming_the_data_dir_and_exit_2(pg_parent):
    data_dir = pg_parent / "pgdata"
    data_dir.mkdir()
    (data_dir / "not-a-cluster").write_text("initdb refuses a non-empty directory")
    proc = run_py("migrate", data_dir=data_dir, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=START_TIMEOUT)
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith(f"herald: embedded PostgreSQL in {data_dir}: initdb exited with status 1"), line
    assert "not empty" in line


@pytest.mark.slow
def test_the_first_start_waits_for_the_lock_another_start_holds(pg_parent):
    """Two first starts at once: the second waits (held here by the test) instead of racing
    the first through useradd and initdb."""
    data_dir = pg_parent / "pgdata"
    stderr_path = pg_parent / "migrate.stderr"
    with open(data_dir.with_name("pgdata.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with stderr_path.open("w") as stderr:
            proc = run_py("migrate", data_dir=data_dir, stderr=stderr)
        try:
            wait_for_sync(lambda: "waiting for another process" in stderr_path.read_text(), START_TIMEOUT)
            assert proc.poll() is None
            assert not (data_dir / "PG_VERSION").exists()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    out, _ = proc.communicate(timeout=START_TIMEOUT)
    assert proc.returncode == 0, stderr_path.read_text()
    assert "migration(s) applied" in out
    assert (data_dir / "PG_VERSION").exists()
    assert not postmaster_running(data_dir)  # migrate started the cluster, so it stopped it


def wait_for_sync(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.05)


@pytest.mark.slow
async def test_the_embedded_postgresql_stops_with_herald_even_after_a_restart_from_outside(pg_parent, tmp_path):
    data_dir = pg_parent / "pgdata"
    herald = Herald.start(tmp_path, "", workers=1, env={"HERALD_DATABASE_DATA_DIR": str(data_dir)})
    try:
        await herald.wait_ready(timeout=START_TIMEOUT)
        first = postmaster_pid(data_dir)
        pg_ctl(data_dir, "-w", "-m", "fast", "restart")  # pgserver knows only the first postmaster
        second = postmaster_pid(data_dir)
        assert second != first
        assert psutil.pid_exists(second)
        herald.signal(signal.SIGTERM)
        assert await herald.wait_exit(timeout=60) == 0, herald.log_tail()
        await wait_for(lambda: not psutil.pid_exists(second), timeout=10)
        assert not postmaster_running(data_dir)
    finally:
        herald.kill()
