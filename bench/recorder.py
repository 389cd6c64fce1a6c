"""What the subscribers received, and waiting on it with a deadline."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from contextlib import suppress

import orjson

from bench import BenchError

WARMUP, BURST, STEADY = "bench-warmup", "bench-burst", "bench-steady"
# Burst deliveries are recognised by this mark, serialised the same by any JSON encoder, and counted without
# parsing: the load generator must spend far less per delivery than the servers it measures.
BURST_MARK = orjson.dumps(BURST)


class Recorder:
    """What the subscribers received: warmed-up subscribers, burst deliveries, steady-rate latencies, drops."""

    def __init__(self) -> None:
        self.warmed: set[int] = set()
        self.burst_deliveries = 0
        self.burst_last_ns = 0
        self.latencies_ns: list[int] = []
        self.disconnects: Counter[str] = Counter()
        self._goal: tuple[Callable[[], bool], asyncio.Future[None]] | None = None

    def burst_delivered(self, received_ns: int) -> None:
        """Count a message that carries BURST_MARK: the hot path, never parsed."""
        self.burst_deliveries += 1
        self.burst_last_ns = received_ns
        if self._goal and self._goal[0]():
            self._wake()

    def receive(self, subscriber: int, message: bytes, received_ns: int) -> bool:
        """Take any other JSON message a subscriber received; False if it is not an event (a reply to an op)."""
        frame = orjson.loads(message)
        if frame.get("op") != "event":
            return False
        self.record(subscriber, frame.get("data"), received_ns)
        if self._goal and self._goal[0]():
            self._wake()
        return True

    def record(self, subscriber: int, data: object, received_ns: int) -> None:
        phase = data.get("phase") if isinstance(data, dict) else None
        if phase == WARMUP:
            self.warmed.add(subscriber)
        elif phase == STEADY:
            self.latencies_ns.append(received_ns - data["t"])

    def disconnected(self, reason: str) -> None:
        self.disconnects[reason] += 1
        self._wake()

    async def until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until `condition` holds, a subscriber drops or `timeout` passes; say whether it holds."""
        if not condition() and not self.disconnects:
            future = asyncio.get_running_loop().create_future()
            self._goal = (condition, future)
            try:
                with suppress(TimeoutError):
                    await asyncio.wait_for(future, timeout)
            finally:
                self._goal = None
        self.check_connected()
        return condition()

    def check_connected(self) -> None:
        if self.disconnects:
            reasons = ", ".join(f"{count} x {reason}" for reason, count in self.disconnects.most_common(3))
            raise BenchError(f"{self.disconnects.total()} subscriber(s) disconnected: {reasons}")

    def _wake(self) -> None:
        if self._goal and not self._goal[1].done():
            self._goal[1].set_result(None)
