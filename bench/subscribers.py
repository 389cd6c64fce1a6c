"""Lean WebSocket and SSE subscribers, written as asyncio protocols.

A subscriber handles each read in one callback: no task wake-up, no message
object per frame. That keeps the load generator's cost per delivery well below
the server's (aiohttp's client spends about as much CPU per message as the
naive server does per send, which would cap the measurable fan-out rate at the
baseline's own), so the figures measure the server, not the load generator.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from urllib.parse import quote

import orjson

from bench import BenchError
from bench.recorder import BURST_MARK, Recorder
from bench.servers import Server

SUBSCRIBE_ID = 1
MAX_HEAD_BYTES = 65536
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONTINUATION, OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x8, 0x9, 0xA
FINAL_TEXT = 0x80 | OP_TEXT
CLOSE_NORMAL = (1000).to_bytes(2, "big")


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status code and lower-cased headers of an HTTP/1.1 response head."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), headers


class HttpStream(asyncio.Protocol):
    """One long-lived GET: parses the response head, then hands every read of the body to `feed`."""

    expected_status = 200

    def __init__(self, channel: str, index: int, recorder: Recorder) -> None:
        loop = asyncio.get_running_loop()
        self.channel = channel
        self.index = index
        self.recorder = recorder
        self.head: asyncio.Future[dict[str, str]] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.pending = b""
        self.streaming = False
        self.closing = False
        self.end_reason = "connection closed by the server"

    @classmethod
    async def open(cls, server: Server, channel: str, index: int, recorder: Recorder) -> HttpStream:
        """Connect, send the request and check the response head (and whatever the transport adds)."""
        loop = asyncio.get_running_loop()
        _, stream = await loop.create_connection(lambda: cls(channel, index, recorder), "127.0.0.1", server.port)
        try:
            stream.transport.write(stream.request(server.port))
            await stream.head
            await stream.handshake()
        except BaseException:
            stream.discard()
            raise
        return stream

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        received_ns = time.time_ns()
        if self.head.cancelled():
            return  # the opener gave up and is discarding this connection
        try:
            if not self.streaming:
                data = self.read_head(data)
            if data and self.streaming:
                self.feed(data, received_ns)
        except ValueError as exc:
            self.fail(f"unparseable response: {exc}")

    def read_head(self, data: bytes) -> bytes:
        """Parse the response head once it is complete; return the body bytes that followed it."""
        self.pending += data
        end = self.pending.find(b"\r\n\r\n")
        if end < 0:
            if len(self.pending) > MAX_HEAD_BYTES:
                raise ValueError("response head too large")
            return b""
        status, headers = parse_head(self.pending[:end])
        body, self.pending = self.pending[end + 4 :], b""
        if status != self.expected_status:
            text = body[:300].decode(errors="replace")
            self.head.set_exception(BenchError(f"{self.describe()} answered {status}: {text}"))
            self.discard()
            return b""
        self.check_head(headers)
        self.streaming = True
        self.head.set_result(headers)
        return body

    def describe(self) -> str:
        return f"GET {self.path()}"

    def path(self) -> str:
        raise NotImplementedError

    def request(self, port: int) -> bytes:
        raise NotImplementedError

    async def handshake(self) -> None:
        """What the transport exchanges after the response head before events flow."""

    def check_head(self, headers: dict[str, str]) -> None:
        """Raise ValueError if the response head is not what the transport requires."""

    def feed(self, data: bytes, received_ns: int) -> None:
        raise NotImplementedError

    def fail(self, reason: str) -> None:
        """Drop the connection as broken: the recorder hears of it."""
        self.end_reason = reason
        self.transport.abort()

    def discard(self) -> None:
        """Drop the connection silently: it failed to open or did not close in time."""
        self.closing = True
        if not self.finished.done():
            self.transport.abort()

    def close(self) -> None:
        self.closing = True
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.end_reason = f"{type(exc).__name__}: {exc}"
        if not self.head.done():
            self.head.set_exception(BenchError(f"{self.describe()}: {self.end_reason} before the response head"))
        elif not self.closing:
            self.recorder.disconnected(self.end_reason)
        self.finished.set_result(None)


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A final client frame (clients must mask; payloads here are small control or op messages)."""
    length = len(payload)
    if length < 126:
        header = bytes([0x80 | opcode, 0x80 | length])
    else:
        header = bytes([0x80 | opcode, 0x80 | 126]) + length.to_bytes(2, "big")
    mask = os.urandom(4)
    key = int.from_bytes((mask * (length // 4 + 1))[:length], "big")
    return header + mask + (int.from_bytes(payload, "big") ^ key).to_bytes(length, "big")


class WsSubscriber(HttpStream):
    """GET /ws, then the welcome / subscribe / ok exchange; events go to the recorder."""

    expected_status = 101

    def __init__(self, channel: str, index: int, recorder: Recorder) -> None:
        super().__init__(channel, index, recorder)
        self.key = base64.b64encode(os.urandom(16)).decode()
        self.fragments: list[bytes] = []
        self.replies: asyncio.Queue[dict | None] = asyncio.Queue()  # None: the connection ended

    def path(self) -> str:
        return "/ws"

    def request(self, port: int) -> bytes:
        return (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self.key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()

    def check_head(self, headers: dict[str, str]) -> None:
        digest = hashlib.sha1(self.key.encode() + WS_GUID, usedforsecurity=False).digest()
        if headers.get("sec-websocket-accept") != base64.b64encode(digest).decode():
            raise ValueError("wrong Sec-WebSocket-Accept in the upgrade response")

    async def handshake(self) -> None:
        welcome = await self.next_reply()
        if welcome.get("op") != "welcome":
            raise BenchError(f"WebSocket: expected a welcome frame first, got {welcome}")
        self.send(orjson.dumps({"op": "subscribe", "id": SUBSCRIBE_ID, "channel": self.channel}))
        while (reply := await self.next_reply()).get("id") != SUBSCRIBE_ID:
            pass
        if reply.get("op") != "ok":
            raise BenchError(f"WebSocket subscribe to {self.channel!r} refused: {reply}")

    async def next_reply(self) -> dict:
        reply = await self.replies.get()
        if reply is None:
            raise BenchError(f"WebSocket ended during the handshake: {self.end_reason}")
        return reply

    def send(self, text: bytes) -> None:
        self.transport.write(masked_frame(OP_TEXT, text))

    def feed(self, data: bytes, received_ns: int) -> None:
        buffer = self.pending + data if self.pending else data
        position, size = 0, len(buffer)
        while size - position >= 2:
            length, start = buffer[position + 1] & 0x7F, position + 2
            if length >= 126:
                start += 2 if length == 126 else 8
                if size < start:
                    break
                length = int.from_bytes(buffer[position + 2 : start], "big")
            if size < start + length:
                break
            if buffer[position] == FINAL_TEXT:
                self.on_text(buffer[start : start + length], received_ns)
            else:
                self.on_frame(buffer[position], buffer[start : start + length], received_ns)
            position = start + length
        self.pending = buffer[position:]

    def on_frame(self, first_byte: int, payload: bytes, received_ns: int) -> None:
        """Any frame but a final text frame: fragments, ping, close (binary and pong are ignored)."""
        opcode = first_byte & 0x0F
        if opcode in (OP_TEXT, OP_CONTINUATION):
            self.fragments.append(payload)
            if first_byte & 0x80:
                self.on_text(b"".join(self.fragments), received_ns)
                self.fragments.clear()
        elif opcode == OP_PING:
            self.transport.write(masked_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            self.on_close(payload)

    def on_text(self, text: bytes, received_ns: int) -> None:
        if BURST_MARK in text:
            self.recorder.burst_delivered(received_ns)
        elif not self.recorder.receive(self.index, text, received_ns):
            self.replies.put_nowait(orjson.loads(text))

    def on_close(self, payload: bytes) -> None:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        self.end_reason = f"WebSocket closed by the server with code {code}"
        if not self.closing:
            self.transport.write(masked_frame(OP_CLOSE, payload[:2]))
        self.transport.close()

    def close(self) -> None:
        """Start the closing handshake; the server answers and drops the connection."""
        self.closing = True
        if not self.transport.is_closing():
            self.transport.write(masked_frame(OP_CLOSE, CLOSE_NORMAL))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.replies.put_nowait(None)


class Dechunker:
    """Incremental decoder of an HTTP/1.1 chunked body."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> bytes:
        buffer = self.pending + data if self.pending else data
        chunks, position = [], 0
        while (line_end := buffer.find(b"\r\n", position)) >= 0:
            size = int(buffer[position:line_end].partition(b";")[0], 16)
            start = line_end + 2
            if len(buffer) < start + size + 2:
                break
            chunks.append(buffer[start : start + size])
            position = start + size + 2
        self.pending = buffer[position:]
        return b"".join(chunks)


def sse_data(message: bytes) -> bytes | None:
    """The data of one SSE message (its data: lines joined), or None for a comment or a retry line."""
    lines = [line[5:].removeprefix(b" ") for line in message.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


class SseSubscriber(HttpStream):
    """GET /sse?channel=…; every `data:` message that is an event goes to the recorder."""

    def __init__(self, channel: str, index: int, recorder: Recorder) -> None:
        super().__init__(channel, index, recorder)
        self.dechunker: Dechunker | None = None
        self.messages = b""

    def path(self) -> str:
        return f"/sse?channel={quote(self.channel)}"

    def request(self, port: int) -> bytes:
        return (
            f"GET {self.path()} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
        ).encode()

    def check_head(self, headers: dict[str, str]) -> None:
        if not headers.get("content-type", "").startswith("text/event-stream"):
            raise ValueError(f"Content-Type {headers.get('content-type')!r} is not text/event-stream")
        if headers.get("transfer-encoding", "").lower() == "chunked":
            self.dechunker = Dechunker()

    def feed(self, data: bytes, received_ns: int) -> None:
        if self.dechunker:
            data = self.dechunker.feed(data)
        stream = self.messages + data
        if b"\r" in stream:
            stream = stream.replace(b"\r\n", b"\n")
        *messages, self.messages = stream.split(b"\n\n")
        for message in messages:
            if BURST_MARK in message:
                self.recorder.burst_delivered(received_ns)
            elif (payload := sse_data(message)) is not None:
                self.recorder.receive(self.index, payload, received_ns)


TRANSPORTS = {"ws": WsSubscriber, "sse": SseSubscriber}
