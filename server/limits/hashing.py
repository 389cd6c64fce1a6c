"""A bound on the bcrypt work one worker accepts at once.

bcrypt runs in threads (a handful), so a flood of logins used to queue behind them: 60
wrong logins took 20 s to answer, and every right one waited in the same line. Past
`auth.bcrypt_queue` hashes running or waiting in this process, a login is refused at
once with 503 and Retry-After instead of joining the queue.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from server.errors import Unavailable

RETRY_AFTER = 1


class HashingQueue:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.busy >= self.limit:
            raise Unavailable(
                "Too many password checks at once; try again shortly", headers={"Retry-After": str(RETRY_AFTER)}
            )
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
