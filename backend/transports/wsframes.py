"""RFC 6455 on the server side, without I/O: the opening handshake's answer, a reader of the
client's frames, and the server's frames as bytes. `backend.transports.wsserver` moves these
bytes; this module only computes them, so every rule here is tested with plain bytes
(tests/unit/transports/test_wsframes.py, against the `websockets` library's own client as
the reference).

What the server speaks, deliberately small:

- No extensions (permessage-deflate is refused by not answering it: tokens are tiny, and
  compression cost ~35 KB per connection, FIELD-NOTES.md), so every RSV bit must be 0.
- Client frames must be masked; server frames never are.
- A message (all of its fragments) larger than `max_size` closes with 1009 as soon as its
  header says so, before its payload is read. Text that is not UTF-8 closes with 1007. Any
  other violation closes with 1002. Control frames may come between fragments.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from typing import Final

try:  # the C version that ships with `websockets` (a dependency of uvicorn[standard])
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a build without its C extension
    from websockets.utils import apply_mask

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_DATA_OPS: Final = frozenset((OP_CONT, OP_TEXT, OP_BINARY))
_CONTROL_OPS: Final = frozenset((OP_CLOSE, OP_PING, OP_PONG))

CLOSE_NORMAL: Final = 1000
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_NO_STATUS: Final = 1005  # a close frame without a code (never sent on the wire)
CLOSE_ABNORMAL: Final = 1006  # the connection dropped without a close frame (never sent)
CLOSE_INVALID_DATA: Final = 1007
CLOSE_TOO_BIG: Final = 1009

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_CONTROL_PAYLOAD: Final = 125


class WireError(Exception):
    """The client broke RFC 6455: close the connection with `code` (and `reason`)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


# ---- the opening handshake -------------------------------------------------------------


class HandshakeError(Exception):
    """An upgrade request that cannot be answered with 101: answer `status` instead."""

    def __init__(self, status: int, reason: str, headers: tuple[tuple[bytes, bytes], ...] = ()):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


def accept_key(key: bytes) -> bytes:
    """`Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def check_upgrade(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The accept key for a request's headers (names in lower case), or `HandshakeError`.
    (The HTTP server already checked `Upgrade: websocket` and `Connection: upgrade`.)"""
    version = key = None
    for name, value in headers:
        if name == b"sec-websocket-version" and version is None:
            version = value.strip()
        elif name == b"sec-websocket-key" and key is None:
            key = value.strip()
    if version != b"13":
        return _refuse(
            426, "only WebSocket version 13 is spoken", ((b"sec-websocket-version", b"13"),)
        )
    if key is None:
        return _refuse(400, "missing Sec-WebSocket-Key header")
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        return _refuse(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    return accept_key(key)


def _refuse(status: int, reason: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    raise HandshakeError(status, reason, headers)


_PHRASES: Final = {
    101: b"Switching Protocols",
    400: b"Bad Request",
    403: b"Forbidden",
    426: b"Upgrade Required",
    500: b"Internal Server Error",
}


def http_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    """An HTTP/1.1 response head (and body): the 101 that opens the connection, or a
    refusal, which also carries `Content-Length` and `Connection: close`."""
    lines = [b"HTTP/1.1 %d %s" % (status, _PHRASES.get(status, b""))]
    lines.extend(name + b": " + value for name, value in headers)
    if status != 101:
        lines.append(b"content-type: text/plain; charset=utf-8")
        lines.append(b"content-length: %d" % len(body))
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def switching_protocols(accept: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    return http_response(
        101,
        [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", accept),
            *headers,
        ],
    )


# ---- server frames -----------------------------------------------------------------------


def frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def text_frame(payload: bytes) -> bytes:
    """A text frame for UTF-8 `payload` (the hot path: one per server frame)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    return frame(OP_TEXT, payload)


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut (at a character) to fit a control frame."""
    data = reason.encode()
    if len(data) > _MAX_CONTROL_PAYLOAD - 2:
        data = data[: _MAX_CONTROL_PAYLOAD - 2].decode(errors="ignore").encode()
    return frame(OP_CLOSE, struct.pack("!H", code) + data)


# ---- client frames -----------------------------------------------------------------------


def _valid_close_code(code: int) -> bool:
    return (1000 <= code <= 1014 and code not in (1004, 1005, 1006)) or 3000 <= code <= 4999


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a client's close frame (1005 when it has no code)."""
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) == 1:
        raise WireError(CLOSE_PROTOCOL_ERROR, "a close frame's code needs two bytes")
    (code,) = struct.unpack("!H", payload[:2])
    if not _valid_close_code(code):
        raise WireError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise WireError(CLOSE_INVALID_DATA, "a close reason must be UTF-8") from None


class FrameReader:
    """Whole messages out of the bytes a client sends. `feed` them, then take what is
    complete with `read`: `(OP_TEXT, str)`, `(OP_BINARY, bytes)`, or a control frame
    `(OP_PING | OP_PONG | OP_CLOSE, payload bytes)`, in order, until it returns None. A
    violation raises `WireError` once, and the reader is of no further use."""

    # Slots: one per connection, tens of thousands at once.
    __slots__ = ("_buffer", "_message_op", "_parts", "_parts_size", "_pos", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        self._pos = 0  # where the unread part of `_buffer` starts
        self._parts: list[bytes] | None = None  # fragments of the message being received
        self._parts_size = 0
        self._message_op = 0  # OP_TEXT or OP_BINARY while fragments are being received

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    def read(self) -> tuple[int, str | bytes] | None:
        while True:
            parsed = self._next_frame()
            if parsed is None:
                return None
            fin, opcode, payload = parsed
            if opcode in _CONTROL_OPS:
                return opcode, payload
            if opcode == OP_CONT:
                if self._parts is None:
                    raise WireError(CLOSE_PROTOCOL_ERROR, "a continuation frame without a message")
                self._parts.append(payload)
                if not fin:
                    continue
                opcode, payload = self._message_op, b"".join(self._parts)
                self._parts, self._parts_size = None, 0
            elif self._parts is not None:
                raise WireError(CLOSE_PROTOCOL_ERROR, "a new message before the last one ended")
            elif not fin:
                self._parts, self._parts_size, self._message_op = [payload], len(payload), opcode
                continue
            if opcode == OP_TEXT:
                try:
                    return OP_TEXT, payload.decode()
                except UnicodeDecodeError:
                    raise WireError(CLOSE_INVALID_DATA, "a text message must be UTF-8") from None
            return OP_BINARY, payload

    def _next_frame(self) -> tuple[bool, int, bytes] | None:
        buf, pos = self._buffer, self._pos
        if len(buf) - pos < 2:
            return None
        first, second = buf[pos], buf[pos + 1]
        if first & 0x70:
            raise WireError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension was agreed)")
        fin, opcode = bool(first & 0x80), first & 0x0F
        if opcode not in _DATA_OPS and opcode not in _CONTROL_OPS:
            raise WireError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if not second & 0x80:
            raise WireError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
        length, start = second & 0x7F, pos + 2
        if length == 126:
            if len(buf) < pos + 4:
                return None
            (length,) = struct.unpack_from("!H", buf, pos + 2)
            start = pos + 4
        elif length == 127:
            if len(buf) < pos + 10:
                return None
            (length,) = struct.unpack_from("!Q", buf, pos + 2)
            if length >> 63:
                raise WireError(CLOSE_PROTOCOL_ERROR, "frame length out of range")
            start = pos + 10
        if opcode in _CONTROL_OPS:
            if not fin:
                raise WireError(CLOSE_PROTOCOL_ERROR, "control frames cannot be fragmented")
            if length > _MAX_CONTROL_PAYLOAD:
                raise WireError(CLOSE_PROTOCOL_ERROR, "control frame payload over 125 bytes")
        else:
            so_far = self._parts_size if opcode == OP_CONT else 0
            if so_far + length > self.max_size:
                raise WireError(
                    CLOSE_TOO_BIG, f"message over {self.max_size} bytes (frame of {length})"
                )
        end = start + 4 + length
        if len(buf) < end:
            return None
        if opcode == OP_CONT:
            self._parts_size += length
        mask = bytes(buf[start : start + 4])
        payload = apply_mask(bytes(buf[start + 4 : end]), mask) if length else b""
        self._pos = end
        if end == len(buf):
            buf.clear()
            self._pos = 0
        return fin, opcode, payload
