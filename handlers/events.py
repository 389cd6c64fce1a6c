"""Publishing and history (PROTOCOL §4)."""

from __future__ import annotations

from aiohttp import web

from handlers.http import identity_of, query_int, read_json_object
from server.events.store import StoredEvent, validate_event, validate_idempotency_key
from server.identity.permissions import check_permission
from server.keys import rules_key, settings_key, store_key
from server.storage.db import DATABASE_DOWN_ERRORS

CHUNK_EVENTS = 100  # read per query at most: with CHUNK_BYTES, what one history request holds in memory
CHUNK_BYTES = 262144


def raw_json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


async def publish(request: web.Request) -> web.Response:
    channel = request.match_info["channel"]
    check_permission(identity_of(request), "publish", channel, request.app[rules_key])
    event_type, data = validate_event(await read_json_object(request))
    key = validate_idempotency_key(request.headers.get("Idempotency-Key"))
    event, created = await request.app[store_key].publish(channel, event_type, data, key)
    return raw_json_response(event.json.encode(), status=201 if created else 200)


async def history(request: web.Request) -> web.StreamResponse:
    """A page streamed in chunks: the next chunk is read only once the last one was written
    (aiohttp's write waits for the socket to drain), so a client that does not read holds
    one chunk, not a page of up to 1000 large events."""
    channel = request.match_info["channel"]
    check_permission(identity_of(request), "subscribe", channel, request.app[rules_key])
    after = query_int(request, "after", 0, 0, 2**62)
    limit = query_int(request, "limit", 100, 1, 1000)
    store, page_bytes = request.app[store_key], request.app[settings_key].events.page_bytes
    chunk = HistoryChunk(limit, page_bytes)
    events, ended = await store.history_chunk(channel, after, *chunk.next_size())  # errors still get a problem
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        await response.write(b'{"items":[')
        while True:
            await response.write(chunk.encode(events))
            if chunk.full or ended:
                break
            events, ended = await store.history_chunk(channel, chunk.last, *chunk.next_size())
        await response.write(b'],"next":' + (str(chunk.last).encode() if chunk.full else b"null") + b"}")
    except DATABASE_DOWN_ERRORS:
        if request.transport is not None:
            request.transport.abort()  # a cut-off body, never a wrong one
        return response
    await response.write_eof()
    return response


class HistoryChunk:
    """Where a streamed page stands: events and bytes sent against the page's two limits."""

    __slots__ = ("bytes", "count", "last", "limit", "page_bytes")

    def __init__(self, limit: int, page_bytes: int) -> None:
        self.limit, self.page_bytes = limit, page_bytes
        self.count = self.bytes = 0
        self.last = 0

    def next_size(self) -> tuple[int, int]:
        return min(self.limit - self.count, CHUNK_EVENTS), min(self.page_bytes - self.bytes, CHUNK_BYTES)

    @property
    def full(self) -> bool:
        return self.count >= self.limit or self.bytes >= self.page_bytes

    def encode(self, events: list[StoredEvent]) -> bytes:
        if not events:
            return b""
        texts = [e.json.encode() for e in events]
        body = (b"," if self.count else b"") + b",".join(texts)
        self.count += len(events)
        self.bytes += sum(map(len, texts))
        self.last = events[-1].offset
        return body
