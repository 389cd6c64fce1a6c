"""Log lines an attacker can provoke (refused connections, parser errors), kept few.

At most one line per kind per interval, saying how many like it were left out since:
the log shows that it happens and how often, and cannot be flooded.
"""

from __future__ import annotations

import logging
import time
from typing import Any


class ThrottledLog:
    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, message: str, **extra: Any) -> bool:
        """Log unless a line of this kind went out within the interval; True when logged."""
        now = time.monotonic()
        if now < self._next.get(kind, 0.0):
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        if len(self._next) > 1000:  # kinds are few and fixed; never let them grow without bound
            self._next.clear()
        self._next[kind] = now + self.interval
        suppressed = self._suppressed.pop(kind, 0)
        self.logger.warning(message, extra={**extra, "kind": kind, "suppressed": suppressed})
        return True
