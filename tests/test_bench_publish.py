"""bench.publish's own arithmetic: a figure the README quotes must count what was sent.

The SQL figure once read 5 events/s on one channel where PostgreSQL had stored some 300/s:
the closed loop added each answer as `stored += await send()`, which reads the total before
suspending and writes it back after, losing every other loop's additions made meanwhile.
"""

from __future__ import annotations

import asyncio

from bench.publish import closed_loop


async def test_the_closed_loop_counts_every_answer_of_concurrent_senders():
    answered = 0

    async def send(index: int) -> int:
        nonlocal answered
        # Suspend as a real request does, so the other loops answer meanwhile.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        answered += 1
        return 1

    stored, elapsed = await closed_loop(0.2, 32, send)

    assert answered > 32 * 2  # the loops did interleave, several rounds each
    assert stored == answered
    assert elapsed > 0
