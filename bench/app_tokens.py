"""GET /api/me with an application token (PROTOCOL §13) beside Herald's own token.

    .venv/bin/python -m bench.app_tokens [--duration 4] [--rounds 3] [--connections 64]

One Herald worker (core 0) with an HS256 `[[auth.issuers]]`; wrk (core 1) alternates the
two tokens round after round. An application token's identity comes from the token alone
(no user row, no database round trip once seen), so it should cost no more than Herald's
own token, whose user is looked up in a short cache.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import jwt

from bench import BenchError
from bench.http import run_wrk
from bench.servers import login, start_herald, stop, wait_ready

ISSUER, SECRET = "https://bench.app.example", "bench application secret, 32+ bytes long"
ISSUER_SETTINGS = f"""
[[auth.issuers]]
issuer = "{ISSUER}"
audience = "herald"
algorithms = ["HS256"]
secret = "{SECRET}"
id_prefix = "app:"
allowed_roles = ["subscriber"]
"""


def app_token() -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "herald", "sub": "42", "roles": ["subscriber"], "iat": now, "exp": now + 3600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.app_tokens", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run (4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over both tokens (3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="herald-bench-app-tokens-") as tmp:
        server = start_herald(Path(tmp), 0, workers=1, name="herald-app-tokens", extra_settings=ISSUER_SETTINGS)
        try:
            tokens = {"herald token": asyncio.run(ready_and_login(server)), "app token": app_token()}
            results: dict[str, list[float]] = {name: [] for name in tokens}
            for round_number in range(1, args.rounds + 1):
                for name, token in tokens.items():
                    rps = run_wrk(server.url("/api/me"), token, args, 1)
                    results[name].append(rps)
                    print(f"round {round_number}: {name:12} /api/me {rps:10,.0f} req/s", file=sys.stderr)
        except BenchError as exc:
            print(f"bench failed: {exc}\n{server.log_tail()}", file=sys.stderr)
            return 1
        finally:
            stop(server)
    herald, app = (statistics.median(results[name]) for name in ("herald token", "app token"))
    print("\n/api/me requests/s, one worker (wrk, medians of the rounds)")
    print(f"herald token {herald:10,.0f}\napp token    {app:10,.0f}\napp/herald   {app / herald:10.2f}x")
    return 0


async def ready_and_login(server) -> str:
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, server, 90)
        return await login(session, server)


if __name__ == "__main__":
    sys.exit(main())
