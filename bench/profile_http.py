"""Where one request's time goes: Herald's whole chain under cProfile while wrk loads one path.

    .venv/bin/python -m bench.profile_http [--path /api/me] [--duration 5] [--top 30]
    .venv/bin/python -m bench.profile_http --publish 16   # single REST publishes over 16 channels

One worker runs in this process (no supervisor fork, so cProfile sees it), on the bench's
settings and its own embedded PostgreSQL, after a warm-up. Printed: the functions by
cumulative and by own time, each divided by the number of requests served, and the CPU
time per request measured without the profiler (load on the machine barely moves it).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from aiohttp import web

from bench.servers import ADMIN_PASSWORD, ADMIN_USERNAME, HERALD_SETTINGS
from server.app import create_app
from server.ops.metrics import enable_multiprocess
from server.process.supervisor import bind_socket, bootstrap_admin, database, with_shared_secrets, with_user_store
from server.process.worker import install_uvloop
from server.settings import load_settings
from server.web.protocol import HeraldRunner


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_http", description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", default="/healthz", help="the path wrk loads (/healthz)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--top", type=int, default=30, help="rows per table (30)")
    parser.add_argument(
        "--publish", type=int, metavar="CHANNELS", help="POST single events over CHANNELS channels instead of --path"
    )
    parser.add_argument(
        "--no-chain",
        action="store_true",
        help="without Herald's front door: what routing, handler and aiohttp cost alone",
    )
    parser.add_argument("--serve", type=int, metavar="PORT", help="only serve until SIGTERM (bench.instructions)")
    return parser.parse_args(argv)


def wrk(url: str, token: str | None, duration: int, connections: int, script: Path | None = None) -> int:
    """Requests served in one wrk run (pinned to core 1 when there is one); `script`: wrk's Lua."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", url]
    if script:
        command[1:1] = ["-s", str(script)]
    if token:
        command[1:1] = ["-H", f"Authorization: Bearer {token}"]
    if (os.cpu_count() or 1) > 1:
        command[:0] = ["taskset", "-c", "1"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"wrk saw errors:\n{out}")
    return int(re.search(r"(\d+) requests in", out)[1])


async def serve(args: argparse.Namespace, settings, sock) -> None:
    app = create_app(settings)
    if args.no_chain:  # an experiment, never a server: aiohttp's own request path, no front door
        del app._handle, app._make_request  # the Application's methods again (middlewares/front_door.py)
    runner = HeraldRunner(app, access_log=None, handle_signals=False)  # the worker's runner
    await runner.setup()
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    if args.serve:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await runner.cleanup()
        return
    url = f"http://{host}:{port}{args.path}"
    token = None
    script = None
    if args.publish:
        from bench.publish import DATA, WRK_SCRIPT

        paths = ", ".join(json.dumps(f"/api/channels/profile-{i}/events") for i in range(args.publish))
        body = json.dumps(json.dumps({"type": "bench", "data": DATA}))
        script = Path(tempfile.mkdtemp(prefix="herald-profile-wrk-")) / "publish.lua"
        script.write_text(WRK_SCRIPT % {"paths": paths, "body": body, "auth": ""})
        url = f"http://{host}:{port}/"
    if args.path.startswith("/api/") or args.publish:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            body = {"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD}
            async with session.post(f"http://{host}:{port}/api/auth/login", json=body) as resp:
                token = (await resp.json())["access_token"]

    async def in_thread(profile: cProfile.Profile | None) -> tuple[int, float]:
        result: list[int] = []
        thread = threading.Thread(
            target=lambda: result.append(wrk(url, token, args.duration, args.connections, script))
        )
        cpu = time.thread_time()
        if profile:
            profile.enable()
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.05)
        if profile:
            profile.disable()
        return result[0], time.thread_time() - cpu

    await in_thread(None)  # warm-up: caches, lazily built objects
    served, cpu = await in_thread(None)
    what = f"POST single events over {args.publish} channels" if args.publish else args.path
    print(f"{what}: {served} requests, {1e6 * cpu / served:.1f} us of CPU per request (no profiler)")
    profile = cProfile.Profile()
    served, _ = await in_thread(profile)
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out)
        stats.sort_stats(order).print_stats(args.top)
        print(f"\n--- by {order}; divide the times by {served} requests ---")
        print(per_request(out.getvalue(), served))
    await runner.cleanup()


def per_request(table: str, served: int) -> str:
    """pstats' table with its seconds turned into microseconds per request."""
    lines = []
    for line in table.splitlines():
        match = re.match(r"\s*([\d/]+)\s+([\d.]+)\s+[\d.]+\s+([\d.]+)\s+[\d.]+\s+(.*)", line)
        if match:
            calls, tottime, cumtime, where = match.groups()
            per = int(calls.split("/")[0]) / served
            own, cum = 1e6 * float(tottime) / served, 1e6 * float(cumtime) / served
            line = f"{per:7.2f} calls  own {own:7.2f} us  cum {cum:7.2f} us  {where}"
        lines.append(line)
    return "\n".join(line for line in lines if line.strip() and not line.startswith(("   Ordered", "   List")))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="herald-profile-") as tmp:
        workdir = Path(tmp)
        settings_path = workdir / "settings.toml"
        settings_path.write_text(HERALD_SETTINGS.format(secrets_dir=json.dumps(str(workdir / "secrets"))))
        environ = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
        if not environ.get("DATABASE_URL"):
            environ["HERALD_DATABASE_DATA_DIR"] = str(workdir / "pgdata")
        settings = load_settings(settings_path, environ)
        with database(settings) as (settings, _):
            admin = {"HERALD_ADMIN_USERNAME": ADMIN_USERNAME, "HERALD_ADMIN_PASSWORD": ADMIN_PASSWORD}
            asyncio.run(with_user_store(settings, lambda users: bootstrap_admin(users, admin)))
            settings = with_shared_secrets(settings)
            (workdir / "metrics").mkdir()
            enable_multiprocess(str(workdir / "metrics"))  # as the supervisor does
            sock = bind_socket("127.0.0.1", args.serve or 0)
            if (os.cpu_count() or 1) > 1 and not args.serve:
                os.sched_setaffinity(0, {0})
            install_uvloop()
            asyncio.run(serve(args, settings, sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
