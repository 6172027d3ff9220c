"""The connection to the server: the pure `Connection` core's decisions (connect, back off,
drop a dead socket, fall back to SSE and back) carried out on a WebSocket, or on plain HTTP
with one EventSource per stream; frames in, decoded, and frames out, encoded. The wire
rules it follows are docs/PROTOCOL.md's: heartbeat, close codes, `resume`, and the HTTP
and SSE transport.

It owns the socket, the EventSources, the "Reconnecting…" indicator (#status) and the
`data-transport` and `data-node` attributes of #app. It tells its owner through three
callbacks: `on_frame(frame)` for every frame but `ping` (answered here), `on_open()` once
a connection is usable, `on_closed()` when it is gone or an attempt failed (before the
next decision is carried out).

Connection attempts are numbered: a decision carried out later (a backoff timer, a
reachability probe) is dropped if a newer attempt began meanwhile (the `online` event,
say), so two attempts never race. Sockets are numbered too (generations): the late events
of one given up are ignored.

JavaScript exceptions thrown by synchronous calls cannot be caught in MicroPython
(FIELD-NOTES.md): `send` only on an OPEN socket, and URLs built from `location`.
"""

import asyncio

from pyscript import document, window
from pyscript.ffi import create_proxy

from tokenwire.browser.web import (
    HTTP_TIMEOUT,
    RETRY_DELAY,
    every,
    get_json,
    http,
    later,
    listen,
    now,
    parse_json,
)
from tokenwire.core import protocol
from tokenwire.core.connection import Connection
from tokenwire.core.session import STREAMING

WS_OPEN = 1
SOURCE_CONNECTING = 0  # EventSource.readyState while it reconnects by itself
SOURCE_CLOSED = 2
PROBE_TIMEOUT = 3.0  # seconds for the reachability probe after a failed WebSocket attempt
TICK = 1.0  # seconds between the watchdog's looks at the connection


class ConnectionDriver:
    def __init__(self, session, on_frame, on_open, on_closed):
        self.session = session  # the streams to resume, and whether an SSE stream still runs
        self.on_frame = on_frame
        self.on_open = on_open
        self.on_closed = on_closed
        self.status = document.getElementById("status")
        self.conn = Connection(lambda: window.Math.random())
        self.ws = None
        self.ws_generation = 0
        self.attempt = 0  # numbers connection attempts; see the module docstring
        self.sources = {}  # stream id -> EventSource, in SSE mode
        self.sources_down = []  # streams whose EventSource is reconnecting
        self._source_proxies = {}
        self._ws_handlers = []

    @property
    def is_open(self):
        return self.conn.state == "open"

    @property
    def transport(self):
        """The transport in use ("ws" or "sse"), or the one the next attempt uses."""
        return self.conn.transport

    # ---- what happens to the page --------------------------------------------------------

    def watch(self):
        """Follow the browser's `online` and `offline` events and run the watchdog (the
        heartbeat check, and the way back from SSE to WebSocket)."""
        # MicroPython calls window.addEventListener with the wrong `this` ("Illegal
        # invocation"); the same window reached as document.defaultView works in both.
        listen(document.defaultView, "online", lambda _e: self._decide(self.conn.online(now())))
        listen(document.defaultView, "offline", lambda _e: self._decide(self.conn.offline(now())))
        every(TICK, self._tick)

    def connect(self):
        """The first connection attempt."""
        self._decide(self.conn.start(now()))

    def _tick(self):
        if self.conn.transport == "ws":
            self._decide(self.conn.tick(now()))
        else:
            retry = self.conn.retry_ws(now())
            if retry is not None:
                self._decide(retry)

    # ---- carrying out decisions ----------------------------------------------------------

    def _decide(self, decision):
        if decision is None:
            self._show_status()
            return
        if decision[0] == "drop":
            self._abandon_ws()
            return
        _, delay, transport = decision
        self.attempt += 1
        attempt = self.attempt
        self._show_status()
        if delay <= 0:
            self._open(transport)
        else:
            later(delay, lambda: self._open(transport) if attempt == self.attempt else None)

    def _show_status(self):
        self.status.hidden = not (self.conn.reconnecting or self.sources_down)

    def _open(self, transport):
        if self.conn.state == "open":
            return  # the `online` event and a timer both asked: one connection is enough
        if transport == "ws":
            self._open_ws()
        else:
            asyncio.create_task(self._open_sse())

    def _open_ws(self):
        self._abandon_ws(report=False)
        scheme = "wss://" if window.location.protocol == "https:" else "ws://"
        ws = window.WebSocket.new(scheme + window.location.host + "/ws")
        self.ws_generation += 1
        generation = self.ws_generation

        def current():
            return generation == self.ws_generation

        opened = []

        def on_open(_event):
            if current():
                opened.append(True)
                self._opened()

        def on_message(event):
            if current():
                self._on_text(event.data)

        def on_close(event):
            if current():
                self.ws = None
                self._closed(event.code, probe=not opened)

        handlers = [create_proxy(on_open), create_proxy(on_message), create_proxy(on_close)]
        ws.onopen, ws.onmessage, ws.onclose = handlers
        self.ws = ws
        self._ws_handlers = handlers

    def _abandon_ws(self, report=True):
        """Stop using the socket now (the watchdog found it dead, the browser went offline,
        the attempt took too long, or a new one replaces it); its late events are ignored
        by generation."""
        ws = self.ws
        if ws is None:
            return
        self.ws = None
        self.ws_generation += 1
        never_opened = self.conn.state != "open"
        if ws.readyState <= WS_OPEN:
            ws.close()
        if report:
            self._closed(4000, probe=never_opened)

    def _opened(self):
        self.conn.opened(now())
        self._show_status()
        document.getElementById("app").setAttribute("data-transport", self.conn.transport)
        if self.conn.transport == "ws":
            self._close_all_sources()
        self.on_open()

    def _closed(self, code, probe=False):
        """The connection is gone (or an attempt failed). A WebSocket attempt that never
        opened first asks whether the server answers plain HTTP at all: only if it does is
        WebSocket to blame (and, after a few such failures, replaced by SSE)."""
        self.on_closed()
        if probe and self.conn.transport == "ws":
            asyncio.create_task(self._probe_then_closed(code, self.attempt))
            return
        self._decide(self.conn.closed(now(), code))

    async def _probe_then_closed(self, code, attempt):
        reachable = await get_json("/healthz", PROBE_TIMEOUT) is not None
        if attempt == self.attempt:  # no newer attempt began while we asked
            self._decide(self.conn.closed(now(), code, reachable))

    # ---- frames out ----------------------------------------------------------------------

    def send(self, frame):
        """Send `frame` on the WebSocket; False if it is not open (nothing was sent)."""
        ws = self.ws
        if ws is None or ws.readyState != WS_OPEN:
            return False  # sending on a connecting or closing socket throws, uncatchably
        ws.send(protocol.encode(frame))
        return True

    def send_or_reopen(self, frame):
        """A `resume`: over the WebSocket, or in SSE mode by reopening the stream's source."""
        if self.conn.transport == "ws":
            self.send(frame)
        else:
            self.open_source(frame["id"], frame["after"])

    def resume_streams(self):
        """On a connection: resume every unfinished stream after its last token."""
        for frame in self.session.resume_frames():
            self.send_or_reopen(frame)

    # ---- frames in -----------------------------------------------------------------------

    def _on_text(self, text):
        frame = protocol.decode(text)
        if frame is None:
            return  # not a frame we understand: never fatal
        if frame["type"] == "hello":
            self.conn.frame(now(), frame["heartbeat"], frame.get("heartbeat_timeout"))
            node = frame.get("node")
            if isinstance(node, str):  # which server node serves the page (tests, support)
                document.getElementById("app").setAttribute("data-node", node)
        else:
            self.conn.frame(now())
        self.dispatch(frame)

    def dispatch(self, frame):
        """Act on a frame, however it came (WebSocket, EventSource, an HTTP answer)."""
        if frame["type"] == "ping":
            self.send(protocol.pong(frame["t"]))
        else:
            self.on_frame(frame)

    # ---- SSE fallback (docs/PROTOCOL.md "HTTP and SSE transport") ------------------------

    async def _open_sse(self):
        attempt = self.attempt
        body = await get_json("/readyz")
        if attempt != self.attempt:
            return  # a newer attempt began meanwhile
        if body is None:
            self._closed(None)
            return
        self._opened()

    def open_source(self, id, after):
        """Stream `id` after its token `after`, over an EventSource of its own."""
        self.close_source(id)
        source = window.EventSource.new("/api/streams/" + id + "?after=" + str(after))

        def on_event(event):
            # The EventSource's own network errors are "error" events too, without data:
            # they are `on_error`'s business.
            data = getattr(event, "data", None)
            if self.sources.get(id) is not source or not isinstance(data, str):
                return
            self._source_up(id)
            frame = protocol.decode(data)
            if frame is not None:
                self.conn.frame(now())
                self.dispatch(frame)

        def on_error(_event):
            if self.sources.get(id) is not source:
                return
            if source.readyState == SOURCE_CONNECTING:
                # It reconnects by itself, resuming after Last-Event-ID; meanwhile the
                # user sees the same "Reconnecting..." as on WebSocket.
                if id not in self.sources_down:
                    self.sources_down.append(id)
                self._show_status()
            elif source.readyState == SOURCE_CLOSED:
                # Given up: the server refused the stream (404, 410), or the browser
                # stopped retrying. Ask the server which (EventSource never says).
                asyncio.create_task(self._check_stream(id))

        proxies = [create_proxy(on_event), create_proxy(on_error)]
        for name in ("token", "done", "error"):
            source.addEventListener(name, proxies[0])
        source.onerror = proxies[1]
        self._source_proxies[id] = proxies  # the proxies live as long as the source
        self.sources[id] = source

    def _source_up(self, id):
        if id in self.sources_down:
            self.sources_down.remove(id)
            self._show_status()

    async def _check_stream(self, id):
        """An EventSource gave up on stream `id`: reopen it if the server still serves it,
        end it with the server's error if not, or try again later if unreachable."""
        stream = self.session.get(id)
        if stream is None or stream.status != STREAMING:
            return
        status, body = await self._probe_stream(id, stream.last)
        if self.conn.transport != "sse" or stream.status != STREAMING:
            return
        if status == 200:
            self.open_source(id, stream.last)
        elif body is not None and body.get("retryable"):
            delay = body.get("retry_after") or RETRY_DELAY
            later(delay, lambda: asyncio.create_task(self._check_stream(id)))
        elif body is not None and body.get("code"):
            self.dispatch(
                {
                    "type": "error",
                    "id": id,
                    "code": body["code"],
                    "message": body.get("message", ""),
                    "retryable": body.get("retryable", False),
                }
            )
        else:
            later(RETRY_DELAY, lambda: asyncio.create_task(self._check_stream(id)))

    async def _probe_stream(self, id, after):
        """The status of `GET /api/streams/<id>` (and its error body), without reading the
        event stream itself: the request is aborted once the headers are in."""
        controller = window.AbortController.new()
        later(HTTP_TIMEOUT, lambda: controller.abort())
        try:
            response = await http(
                "/api/streams/" + id + "?after=" + str(after), signal=controller.signal
            )
            status = int(response.status)
            text = "" if status == 200 else str(await response.text())
        except Exception:
            return None, None
        controller.abort()
        return parse_json(status, text)

    def close_source(self, id):
        """Close stream `id`'s EventSource, if it has one."""
        source = self.sources.pop(id, None)
        self._source_proxies.pop(id, None)
        self._source_up(id)
        if source is not None:
            source.close()

    def _close_all_sources(self):
        for id in list(self.sources):
            self.close_source(id)
