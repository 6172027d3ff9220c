"""A Server-Sent Events client for the tests: httpx streaming plus a parser that follows the
SSE spec (html.spec.whatwg.org, "Interpreting an event stream") on the raw bytes, so the
tests see exactly what a browser's EventSource would, and a little more: keep-alive
comments are recorded (a browser drops them), and each event keeps the `id:` it carried
itself (a browser keeps the last one seen instead; that is `SseParser.last_event_id`).

Also a raw HTTP/1.1 request over a plain socket, for a client that must stop reading at the
TCP level (httpx reads ahead), and `fold` to keep a `StreamView` from events, so the
WebSocket and SSE tests share the exactly-once checks.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from harness.server import TIMEOUT, Server, StreamView

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass
class Event:
    event: str
    data: dict[str, Any]
    id: str | None  # the `id:` field of this event, None if it had none


@dataclass
class Comment:
    text: str  # after the colon
    events_before: int  # how many events had been dispatched when it arrived


@dataclass
class SseParser:
    """Bytes in, events and comments out; never awaits."""

    events: list[Event] = field(default_factory=list)
    comments: list[Comment] = field(default_factory=list)
    last_event_id: str = ""  # what an EventSource would send as Last-Event-ID
    _buffer: bytes = b""
    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse `chunk`; returns the events it completed."""
        self._buffer += chunk
        found: list[Event] = []
        while True:
            match = _LINE_END.search(self._buffer)
            if match is None:
                break
            # A CR that ends the buffer may be the first half of a CRLF: wait for more.
            if match.group() == b"\r" and match.end() == len(self._buffer):
                break
            line = self._buffer[: match.start()].decode("utf-8", errors="replace")
            self._buffer = self._buffer[match.end() :]
            event = self._line(line)
            if event is not None:
                found.append(event)
        return found

    def _line(self, line: str) -> Event | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(Comment(line[1:], len(self.events)))
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
            self.last_event_id = value
        # `retry` and unknown fields change nothing the tests look at.
        return None

    def _dispatch(self) -> Event | None:
        event_type, data, event_id = self._event or "message", self._data, self._id
        self._event, self._data, self._id = "", [], None
        if not data:  # the spec: an event without data is not dispatched
            return None
        event = Event(event_type, json.loads("\n".join(data)), event_id)
        self.events.append(event)
        return event


def parse_events(body: bytes) -> SseParser:
    """A whole SSE body, parsed (an unfinished last event is dropped, as the spec says)."""
    parser = SseParser()
    parser.feed(body)
    return parser


def fold(events: Iterable[Event], view: StreamView | None = None) -> StreamView:
    """Apply the stream frames among `events` to `view` (a new one by default)."""
    view = StreamView() if view is None else view
    for event in events:
        if event.event in ("token", "done", "error"):
            view.apply(event.data)
    return view


class SseResponse:
    """One `GET /api/streams/<id>` response, read event by event, each read bounded."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.parser = SseParser()
        self.ended = False  # the server ended the response (the body is complete)
        self._pending: deque[Event] = deque()
        self._chunks = response.aiter_bytes()

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def headers(self) -> httpx.Headers:
        return self.response.headers

    @property
    def events(self) -> list[Event]:
        return self.parser.events

    @property
    def comments(self) -> list[Comment]:
        return self.parser.comments

    async def error_body(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The JSON body of a response refused before streaming."""
        async with asyncio.timeout(timeout):
            await self.response.aread()
        body: dict[str, Any] = self.response.json()
        return body

    async def next(self, timeout: float = TIMEOUT) -> Event | None:
        """The next event; None once the server has ended the response."""
        async with asyncio.timeout(timeout):
            while not self._pending and not self.ended:
                try:
                    chunk = await anext(self._chunks)
                except StopAsyncIteration:
                    self.ended = True
                else:
                    self._pending.extend(self.parser.feed(chunk))
        return self._pending.popleft() if self._pending else None

    async def __aiter__(self) -> AsyncIterator[Event]:
        while (event := await self.next()) is not None:
            yield event

    async def until(self, match: Callable[[Event], bool], timeout: float = TIMEOUT) -> Event:
        """Read until an event matches; fails if the response ends first."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.next()
                if event is None:
                    raise AssertionError("the response ended before the expected event")
                if match(event):
                    return event

    async def read_to_end(self, timeout: float = TIMEOUT) -> list[Event]:
        """Read until the server ends the response; every event of the response."""
        async with asyncio.timeout(timeout):
            while await self.next() is not None:
                pass
        return self.events

    async def close(self) -> None:
        """Stop reading and drop the connection, as a network cut would."""
        await self._chunks.aclose()  # type: ignore[attr-defined]
        await self.response.aclose()


@asynccontextmanager
async def sse_stream(
    server: Server,
    stream_id: str,
    *,
    cookie: str | None = None,
    after: int | str | None = None,
    last_event_id: int | str | None = None,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[SseResponse]:
    """`GET /api/streams/<stream_id>` on a connection of its own; closed on exit, read to
    the end or not."""
    sent = {"Accept": "text/event-stream", **(headers or {})}
    if cookie is not None:
        sent["Cookie"] = cookie
    if last_event_id is not None:
        sent["Last-Event-ID"] = str(last_event_id)
    params = {} if after is None else {"after": str(after)}
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        request = http.build_request(
            "GET", f"/api/streams/{stream_id}", headers=sent, params=params
        )
        response = await asyncio.wait_for(http.send(request, stream=True), TIMEOUT)
        sse = SseResponse(response)
        try:
            yield sse
        finally:
            await sse.close()


# ---- raw HTTP/1.1, for a client that stops reading the socket ----------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes  # de-chunked
    complete: bool  # the body was ended by the server (last chunk), not cut off


async def raw_request(
    server: Server, head: str, *, body: bytes = b"", rcvbuf: int | None = None
) -> socket.socket:
    """Connect (with a receive buffer of `rcvbuf` bytes, set before connecting so the TCP
    window is negotiated small) and send `head` (request line and headers, without the
    final blank line) and `body`. Returns the non-blocking socket, nothing read yet."""
    sock = socket.socket()
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(TIMEOUT):
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            await loop.sock_sendall(sock, head.encode("latin-1") + b"\r\n\r\n" + body)
    except BaseException:
        sock.close()
        raise
    return sock


async def read_until_eof(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Everything the server sends until it closes the connection; closes the socket."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    with sock:
        async with asyncio.timeout(timeout):
            while chunk := await loop.sock_recv(sock, 65536):
                received += chunk
    return bytes(received)


def parse_response(raw: bytes) -> RawResponse:
    """An HTTP/1.1 response as read off the socket: status, headers, de-chunked body."""
    head, separator, rest = raw.partition(b"\r\n\r\n")
    if not separator:
        raise AssertionError(f"no complete response head in {raw[:200]!r}")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, complete = dechunk(rest)
    else:
        length = int(headers.get("content-length", len(rest)))
        body, complete = rest[:length], len(rest) >= length
    return RawResponse(status, headers, body, complete)


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """Decode a chunked transfer-encoding body; (the data of every whole chunk, whether the
    last chunk was reached)."""
    body = bytearray()
    position = 0
    while True:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            return bytes(body), False
        size = int(data[position:line_end].split(b";", 1)[0], 16)
        start = line_end + 2
        if size == 0:
            return bytes(body), True
        if start + size + 2 > len(data):
            return bytes(body), False
        body += data[start : start + size]
        position = start + size + 2
