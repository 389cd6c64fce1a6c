"""JSON-line logging on stderr, with the request id and worker id on every line."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import time
from typing import Any, BinaryIO

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
worker_id: str | None = None  # set once per process by the worker entry point

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if worker_id is not None:
            entry["worker"] = worker_id
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        entry.update({k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")})
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: int = logging.INFO) -> None:
    # Every request logs a line: skip what the JSON lines never show (the caller's source
    # location walks the stack; thread and process names cost a lookup each).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pgserver").setLevel(logging.WARNING)


class AccessLog:
    """One JSON line per request, in the same shape as every other log line.

    Written straight to the stream: the logging module's per-record machinery costs
    about 13 µs a line (measured), a large share of a small request. And written once
    per event-loop turn, not once per request: every line of the requests answered in
    one turn goes out in one write, so 32 requests in flight cost one system call, not
    32. A line waits at most until the loop's next turn (a worker killed by SIGKILL can
    lose that turn's lines; an exiting worker flushes them).
    """

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr.buffer
        self._second = -1
        self._prefix = ""
        self._pending: list[bytes] = []

    def timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z"

    def write(self, fields: dict[str, Any]) -> None:
        entry: dict[str, Any] = {"time": self.timestamp(), "level": "info", "logger": "herald.access"}
        entry["message"] = "request"
        if worker_id is not None:
            entry["worker"] = worker_id
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        entry.update(fields)
        pending = self._pending
        pending.append(orjson.dumps(entry))
        if len(pending) == 1:  # the first line of this turn: flush when the loop comes round
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a script, a test): at once
                self.flush()

    def flush(self) -> None:
        if self._pending:
            lines, self._pending = self._pending, []
            lines.append(b"")
            self.stream.write(b"\n".join(lines))
            self.stream.flush()
