"""Group commit: concurrent publishes of one process share one statement and one commit.

A publish is a commit, and a commit costs a round trip and a WAL flush whatever it
holds; so while one batch is in flight the next one gathers, and it leaves the moment
the first returns. There is no timer: an idle server sends a lone publish at once.

Every batch is one call of the SQL function publish_batch (migration 130), which stores
each item with store_event, the definition SQL publishers share. A request (one REST or
WebSocket publish, or a whole batch-endpoint call) is stored all or none. What the
batch does not decide for the others:
- a request on a channel that an open transaction holds (an application publishing
  from SQL) comes back 'busy' and is published alone, waiting at most publish_wait,
  so it holds up neither the batch nor the channels of the other requests;
- a database error caused by one request fails the statement: each request is then
  retried alone, so only the faulty one sees its error;
- a lost database fails every request of the batch (503); the one transaction means
  none of it is half-stored.

Up to `flights` batches (database.publish_flights: by default two for a lone worker,
one each where there are more) are in the air at once, each on its own connection.
Measured with one, a flight of 16 publishes took 5.7 ms where the statement alone takes
2, the rest being the round trip and the event loop's turn before the answer was read.
A second flight is already in the database when the first commits; on a channel the
first one holds it waits for that commit (the channel row's lock), so offsets stay
gapless and in commit order. Workers' flights queue on each other's channel locks the
same way, which is why several workers keep one each (server/settings.py measured it).

Flights keep their pooled connections between them instead of taking one from the pool
each time: giving a connection back costs asyncpg's reset query, a round trip before
the next flight could leave. They keep at most pool_size - 1 (the rest of Herald needs
one too; a pool of one is shared as before). A broken connection goes back to the pool
(which discards it) and the next flight takes a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import asyncpg

from server.errors import Unavailable, ValidationError
from server.storage.db import DATABASE_DOWN_ERRORS, committed_connection

log = logging.getLogger("herald.committer")

PUBLISH_BATCH_SQL = "SELECT item, status, stored_offset, stored_json FROM publish_batch($1, $2, $3, $4, $5, $6, $7, $8)"
# database.publish_synchronous_commit = false: the flights' connections commit without
# waiting for the WAL flush (PostgreSQL's synchronous_commit = off, this session only).
ASYNC_COMMIT_SQL = "SET synchronous_commit = off"
MAX_BATCH_ITEMS = 5000  # one statement's arrays; more waits for the next flight


@dataclass(frozen=True, slots=True)
class Item:
    channel: str
    type: str
    data: str  # JSON text


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one item: 'new', 'replay' (an idempotency key seen before) or 'conflict'."""

    status: str
    offset: int | None
    json: str | None


@dataclass(slots=True)
class Request:
    items: Sequence[Item]
    key: str | None  # an idempotency key (single publishes: one item)
    fingerprint: bytes | None
    future: asyncio.Future[list[Outcome]] = field(repr=False)


def channel_busy() -> Unavailable:
    return Unavailable("The channel is held by an open database transaction; try again later")


class GroupCommitter:
    def __init__(
        self,
        pool: asyncpg.Pool,
        publish_wait: float,
        on_stored: Callable[[int], None],
        flights: int = 2,
        synchronous_commit: bool = True,
    ) -> None:
        self.pool = pool
        self.wait_ms = max(1, round(publish_wait * 1000))
        self.on_stored = on_stored  # called with the number of new events of each commit
        self.flights = flights
        self.synchronous_commit = synchronous_commit
        self.keep = min(flights, pool.get_max_size() - 1)  # connections kept between flights
        self._pending: deque[Request] = deque()
        self._flying = 0  # flights that may still take pending requests
        self._tasks: set[asyncio.Task[None]] = set()  # flights and lone publishes, held until done
        self._idle: list[asyncpg.Connection] = []  # the flights' own connections, kept between flights
        # Tests hold a flight here to make publishes gather behind it.
        self.before_flight: Callable[[list[Request]], object] | None = None

    @property
    def pending(self) -> int:
        """Requests gathered for the next flight."""
        return len(self._pending)

    async def publish(
        self, items: Sequence[Item], key: str | None = None, fingerprint: bytes | None = None
    ) -> list[Outcome]:
        """Store the items (one request: all or none); one outcome per item, in order."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append(Request(items, key, fingerprint, future))
        if self._flying < self.flights:
            self._flying += 1  # until the flight has left its loop (counted down in _fly, not by a
            # done callback: one that ran a turn late left the next publish with no flight to take it)
            self._spawn(self._fly())
        return await future

    def _spawn(self, job) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)  # a strong reference until done
        task.add_done_callback(self._tasks.discard)

    async def _fly(self) -> None:
        """One flight after another, while requests wait; each flight on a connection of its own."""
        conn: asyncpg.Connection | None = None
        try:
            while self._pending:
                batch, size = [], 0
                while self._pending and (not batch or size + len(self._pending[0].items) <= MAX_BATCH_ITEMS):
                    request = self._pending.popleft()
                    batch.append(request)
                    size += len(request.items)
                try:
                    if self.before_flight is not None:
                        waiting = self.before_flight(batch)
                        if asyncio.iscoroutine(waiting):
                            await waiting
                    while conn is None or not is_open(conn):  # none yet, or the database closed it meanwhile
                        await self._drop(conn)
                        conn = None
                        conn = self._idle.pop() if self._idle else await self._acquire()
                    if not await self._commit(conn, batch):
                        await self._drop(conn)
                        conn = None
                except Exception as exc:  # a bug here (or no connection): never leave callers waiting
                    if not isinstance(exc, DATABASE_DOWN_ERRORS):
                        log.exception("group commit failed")
                    await self._drop(conn)  # in whatever state that left it
                    conn = None
                    for request in batch:
                        _fail(request, exc)
        finally:
            # Before any await: from here on a publish must start a flight of its own.
            self._flying -= 1
            if conn is not None:
                if len(self._idle) < self.keep:
                    self._idle.append(conn)
                else:
                    await self._drop(conn)

    async def close(self) -> None:
        """After the last publish (the app's cleanup, before the pool closes)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._drop(conn)

    async def _acquire(self) -> asyncpg.Connection:
        conn = await self.pool.acquire()
        if not self.synchronous_commit:
            try:
                await conn.execute(ASYNC_COMMIT_SQL)  # undone by the pool's reset when it goes back
            except BaseException:
                await self._drop(conn)
                raise
        return conn

    async def _drop(self, conn: asyncpg.Connection | None) -> None:
        if conn is not None:
            with contextlib.suppress(*DATABASE_DOWN_ERRORS):
                await self.pool.release(conn)  # a broken one is terminated there, never reused

    async def _commit(self, conn: asyncpg.Connection, batch: list[Request]) -> bool:
        """One flight's statement and commit; False if the connection broke (the batch got 503)."""
        try:
            rows = await conn.fetch(PUBLISH_BATCH_SQL, *_arguments(batch), self.wait_ms, True)
        except DATABASE_DOWN_ERRORS as exc:
            for request in batch:
                _fail(request, exc)
            return False
        except asyncpg.PostgresError as exc:
            if len(batch) == 1:
                _fail(batch[0], _translate(exc))
                return True
            log.warning("a batch of %d publishes failed (%s); retrying each alone", len(batch), exc.sqlstate)
            # On a connection that broke meanwhile, each of the rest fails at once (503).
            return all([await self._commit(conn, [request]) for request in batch])
        stored = 0
        for request, outcomes in zip(batch, _split(batch, rows), strict=True):
            if any(o.status == "busy" for o in outcomes):
                self._spawn(self._publish_alone(request))
                continue
            stored += sum(o.status == "new" for o in outcomes)
            _succeed(request, outcomes)
        if stored:
            self.on_stored(stored)
        return True

    async def _publish_alone(self, request: Request) -> None:
        """A request on a channel another transaction holds: wait for it, publish_wait at most."""
        try:
            async with committed_connection(self.pool) as conn:  # committed: answered, whatever breaks after
                rows = await conn.fetch(PUBLISH_BATCH_SQL, *_arguments([request]), self.wait_ms, False)
            outcomes = _split([request], rows)[0]
        except (*DATABASE_DOWN_ERRORS, asyncpg.PostgresError) as exc:
            _fail(request, _translate(exc) if isinstance(exc, asyncpg.PostgresError) else exc)
            return
        stored = sum(o.status == "new" for o in outcomes)
        if stored:
            self.on_stored(stored)
        _succeed(request, outcomes)


def is_open(conn: asyncpg.Connection) -> bool:
    """Whether a pooled connection kept out of the pool still works: one the server closed
    has been taken back by the pool already, and its proxy refuses every call."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


def _arguments(batch: list[Request]) -> tuple[list, ...]:
    """publish_batch's item arrays: each item's request (its index), channel, type, data, key, fingerprint."""
    requests, channels, types, datas, keys, prints = [], [], [], [], [], []
    for index, request in enumerate(batch):
        for item in request.items:
            requests.append(index)
            channels.append(item.channel)
            types.append(item.type)
            datas.append(item.data)
            keys.append(request.key)
            prints.append(request.fingerprint)
    return requests, channels, types, datas, keys, prints


def _split(batch: list[Request], rows: list[asyncpg.Record]) -> list[list[Outcome]]:
    """The rows (one per item, in item order) cut back into the requests' outcome lists."""
    outcomes = [Outcome(r["status"], r["stored_offset"], r["stored_json"]) for r in rows]
    result, start = [], 0
    for request in batch:
        result.append(outcomes[start : start + len(request.items)])
        start += len(request.items)
    return result


def _translate(exc: asyncpg.PostgresError) -> BaseException:
    """An error of one request alone, as its caller sees it: 503 behind a held channel, 422 for
    data the database refuses (what validation let through), else the error itself (a 500)."""
    if isinstance(exc, asyncpg.exceptions.LockNotAvailableError):
        return channel_busy()
    if isinstance(exc, asyncpg.exceptions.DataError):
        return ValidationError(f"The database refused this event: {exc.message}")
    return exc


def _succeed(request: Request, outcomes: list[Outcome]) -> None:
    if not request.future.done():
        request.future.set_result(outcomes)


def _fail(request: Request, exc: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(exc)
