"""Bytes on the wire, encoded once per event and shared by every subscriber.

A server-to-client WebSocket frame is never masked, and an uncompressed one is the
same bytes for every connection, so a text frame can be built once and written to
each transport as is. SSE bodies go out chunked (HTTP/1.1), so an SSE message is
wrapped in its chunk framing once too.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import orjson

from server.events.store import StoredEvent


def websocket_text_frame(payload: bytes) -> bytes:
    """RFC 6455 §5.2: FIN + text opcode, unmasked, with the shortest length encoding."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 127, length)
    return header + payload


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def sse_message(data: bytes, event_id: str | None = None) -> bytes:
    """One SSE message; data must hold no newline (compact JSON never does)."""
    if event_id is None:
        return b"data: " + data + b"\n\n"
    return b"id: " + event_id.encode() + b"\ndata: " + data + b"\n\n"


def event_payload(event_json: bytes) -> bytes:
    """The event JSON with "op":"event" first, as WebSocket and SSE clients see it."""
    return b'{"op":"event",' + event_json[1:]


# SSE cursors: one stream's position in each channel it follows, as a compact opaque id.


def channel_set_tag(channels: tuple[str, ...]) -> str:
    return format(zlib.crc32("\n".join(channels).encode()), "x")


def encode_cursor(tag: str, offsets: list[int]) -> str:
    return f"{tag}-{'.'.join(map(str, offsets))}"


def decode_cursor(cursor: str | None, channels: tuple[str, ...]) -> dict[str, int] | None:
    """Positions per channel, or None when the cursor is absent, malformed or for other channels."""
    if not cursor:
        return None
    tag, _, offsets = cursor.partition("-")
    if tag != channel_set_tag(channels):
        return None
    parts = offsets.split(".")
    if len(parts) != len(channels) or not all(p.isascii() and p.isdigit() and len(p) < 19 for p in parts):
        return None
    return dict(zip(channels, map(int, parts), strict=True))


@dataclass(slots=True)
class EncodedEvent:
    """An event encoded once for every transport; built by the hub, shared by subscribers."""

    channel: str
    offset: int
    ws_frame: bytes
    sse_data: bytes  # the `data:` line of the SSE message, without id
    _single_sse_chunk: bytes | None = None

    @classmethod
    def of(cls, event: StoredEvent) -> EncodedEvent:
        payload = event_payload(event.json.encode())
        return cls(event.channel, event.offset, websocket_text_frame(payload), payload)

    def single_channel_sse_chunk(self) -> bytes:
        """The whole chunk for a stream following only this channel: the same for all of them."""
        if self._single_sse_chunk is None:
            tag = channel_set_tag((self.channel,))
            self._single_sse_chunk = http_chunk(sse_message(self.sse_data, encode_cursor(tag, [self.offset])))
        return self._single_sse_chunk


@dataclass(frozen=True, slots=True)
class EncodedNotice:
    """A message that is not an event (presence join/leave): no offset, no SSE id, so it moves
    no cursor and is never replayed. Encoded once per change, shared by every subscriber."""

    ws_frame: bytes
    sse_message: bytes
    sse_chunk: bytes

    @classmethod
    def of(cls, message: dict) -> EncodedNotice:
        payload = orjson.dumps(message)
        sse = sse_message(payload)
        return cls(websocket_text_frame(payload), sse, http_chunk(sse))

    @classmethod
    def joined(cls, notices: list[EncodedNotice]) -> EncodedNotice:
        """Several notices as one write: frames and SSE messages concatenate, in one HTTP chunk."""
        if len(notices) == 1:
            return notices[0]
        sse = b"".join(n.sse_message for n in notices)
        return cls(b"".join(n.ws_frame for n in notices), sse, http_chunk(sse))
