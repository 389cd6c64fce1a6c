"""Every benchmark in one run: `.venv/bin/python -m bench` (about ten minutes on 2 cores).

HTTP through the whole chain (1 and 2 workers against a bare aiohttp app), WebSocket
and SSE fan-out at 1000 and 5000 subscribers with RSS per idle WebSocket at 5000
connections (against a naive broadcast server), and publish throughput (against the
naive server's in-memory publish), and presence at 5000 subscribers (against the same
connects on a channel without presence). Each part runs its own baseline in the same run.
"""

from __future__ import annotations

import os
import platform
import sys

from bench import app_tokens, fanout, http, presence, publish


def main() -> int:
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {platform.machine()}, {cores} cores, Python {platform.python_version()}")
    failures = 0
    failures += http.main([]) != 0
    failures += app_tokens.main([]) != 0
    failures += fanout.main(["--subscribers", "1000", "--idle", "5000"]) != 0
    failures += fanout.main(["--subscribers", "5000", "--idle", "0", "--events", "100", "--duration", "5"]) != 0
    failures += publish.main([]) != 0
    failures += presence.main([]) != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
