"""tokenwire's own WebSocket protocol for uvicorn (`ws=WireProtocol`): an ASGI WebSocket
server whose connections may be *detached* from the ASGI app once accepted.

Why not uvicorn's own implementations: with them, an open connection is an ASGI
application call that never returns. Every idle connection then keeps the whole stack alive
(about 15 coroutine frames of middlewares and framework, the framework's connection object,
the request's scope and headers) plus the `websockets` library's protocol state and a
queue: about 30 KB of the 33 KB a tokenwire connection cost (bench/idle.py). And every
frame sent went through several awaits on its way to the socket.

How it works: the upgrade is an ordinary ASGI WebSocket call, so every middleware sees
it (request id, origin, identity cookie, admission) and answers with `websocket.accept`
or `websocket.close` as usual. An app that finds `scope[DETACH]` may then hand the
connection a `WireHandler` and return: the call, its coroutine frames and its scope are
gone, and from then on this protocol calls the handler for each message and it writes
frames straight to the transport (`Wire`). An app that does not detach gets the plain
ASGI behaviour (`receive` and `send`, the connection closes when the call returns), so
any route still works.

The rules of RFC 6455 live in `backend.transports.wsframes`, without I/O.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Final, Protocol, cast
from urllib.parse import unquote

from uvicorn.config import Config
from uvicorn.protocols.utils import ClientDisconnected, get_local_addr, get_remote_addr, is_ssl
from uvicorn.server import ServerState

from backend.transports.wsframes import (
    CLOSE_ABNORMAL,
    CLOSE_NORMAL,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    HandshakeError,
    WireError,
    check_upgrade,
    close_frame,
    frame,
    http_response,
    parse_close,
    switching_protocols,
    text_frame,
)

log = logging.getLogger("uvicorn.error")

DETACH: Final = "tokenwire.detach"  # the scope key of `WireProtocol.detach`
# After our close frame, how long the client has to answer with its own before the
# transport is closed anyway (also bounds a close stuck behind data a client never reads).
CLOSE_TIMEOUT: Final = 2.0
GOING_AWAY: Final = 1001
INTERNAL_ERROR: Final = 1011
SERVICE_RESTART: Final = 1012

# States.
_HANDSHAKE, _OPEN, _CLOSING, _CLOSED = range(4)


class WireHandler(Protocol):
    """What a detached connection calls: each on the event loop, none may block."""

    def on_text(self, text: str) -> None: ...

    def on_binary(self, data: bytes) -> None: ...

    def on_writable(self) -> None:
        """The transport's buffer drained after `Wire.writable` was False: write again."""

    def on_closed(self, code: int) -> None:
        """The connection is gone (`code`: the client's close code, or 1006 for a drop);
        called exactly once, also after `Wire.close`."""


class Wire(Protocol):
    """What a detached handler writes with."""

    @property
    def writable(self) -> bool:
        """False while the transport's buffer is over its high-water mark (or closing)."""

    def send_texts(self, payloads: list[bytes]) -> None:
        """Text frames of UTF-8 `payloads`, in one write."""

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame (behind anything already written) and close the connection
        when the client answers, or after CLOSE_TIMEOUT."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class WireProtocol(asyncio.Protocol):
    # Slots: one per connection; the attributes of the handshake are dropped once detached.
    __slots__ = (
        "_app",
        "_app_state",
        "_close_timer",
        "_config",
        "_detached",
        "_handler",
        "_held",
        "_inbox",
        "_loop",
        "_reader",
        "_server_state",
        "_state",
        "_waiting",
        "_writable",
        "scope",
        "transport",
    )

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()  # pragma: no cover - uvicorn loads it before serving
        self._config: Config | None = config
        self._server_state = server_state
        self._app_state: dict[str, Any] | None = app_state
        self._app: Any = config.loaded_app
        self._loop = _loop or asyncio.get_event_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.scope: dict[str, Any] | None = None
        self._state = _HANDSHAKE
        self._reader = FrameReader(config.ws_max_size)
        self._handler: WireHandler | None = None
        self._writable = True
        self._close_timer: asyncio.TimerHandle | None = None
        # The plain ASGI mode only (None once detached): messages for `receive`, and the
        # futures `receive` and `send` wait on.
        self._inbox: deque[dict[str, Any]] | None = deque()
        self._waiting: list[asyncio.Future[None]] = []
        self._held = False  # a detached handler paused reading
        self._detached = False

    # ---- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._server_state.connections.add(cast(Any, self))

    # Every entry point from asyncio contains what it raises (`_failed`): an exception that
    # reached asyncio would be logged as a fatal error of the transport, which is then
    # dropped without a close frame.

    def data_received(self, data: bytes) -> None:
        try:
            if self.scope is None and self._state == _HANDSHAKE:
                self._handshake(data)  # uvicorn hands over the upgrade request first
                return
            self._reader.feed(data)
            if self._state in (_OPEN, _CLOSING):
                self._read_frames()
        except Exception as exc:
            self._failed("reading", exc)

    def _failed(self, where: str, exc: Exception) -> None:
        """A bug, here or in the handler: log it once, close with 1011 (or answer 500 to a
        handshake), and tell the owner once, as for any close."""
        log.error("WebSocket connection failed while %s; closed with 1011", where, exc_info=exc)
        if self._state == _HANDSHAKE:
            self._refuse(500, "Internal Server Error")
            return
        if self._state == _OPEN:
            self.transport.write(close_frame(INTERNAL_ERROR, "internal error"))
        self._state = _CLOSED
        self.transport.close()
        try:
            self._closed(INTERNAL_ERROR)
        except Exception:
            log.exception("WebSocket connection failed while closing after a failure")

    def eof_received(self) -> bool | None:
        return None  # close the transport: a half-closed WebSocket is of no use

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        self._wake()
        if self._handler is not None and self._state == _OPEN:
            try:
                self._handler.on_writable()
            except Exception as exc:
                self._failed("writing", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server_state.connections.discard(cast(Any, self))
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        already = self._state == _CLOSED
        self._state = _CLOSED
        self._writable = False
        try:
            if not already:
                self._closed(CLOSE_ABNORMAL)
        except Exception:
            log.exception("WebSocket connection failed while closing")
        self._wake()

    def shutdown(self) -> None:
        """uvicorn's shutdown (after tokenwire's drain): close whatever is still open."""
        if self._state == _HANDSHAKE:
            if self.scope is not None:
                self._refuse(500, "server shutting down")
            else:
                self.transport.close()
        elif self._state == _OPEN:
            self.close(SERVICE_RESTART, "server restarting")
            self._closed(SERVICE_RESTART)
        elif not self.transport.is_closing():
            self.transport.close()

    # ---- the handshake -------------------------------------------------------------------

    def _handshake(self, request: bytes) -> None:
        config = self._config
        assert config is not None
        head, _, _ = request.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        target = lines[0].split(b" ")[1] if len(lines[0].split(b" ")) == 3 else b"/"
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        try:
            accept = check_upgrade(headers)
        except HandshakeError as exc:
            self._refuse(exc.status, exc.reason, list(exc.headers))
            return
        raw_path, _, query = target.partition(b"?")
        subprotocols = [
            token.strip()
            for name, value in headers
            if name == b"sec-websocket-protocol"
            for token in value.decode("latin-1").split(",")
        ]
        root = config.root_path
        self.scope = {
            "type": "websocket",
            "asgi": {"version": config.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "wss" if is_ssl(self.transport) else "ws",
            "server": get_local_addr(self.transport),
            "client": get_remote_addr(self.transport),
            "root_path": root,
            "path": root + unquote(raw_path.decode("latin-1")),
            "raw_path": root.encode("ascii") + raw_path,
            "query_string": query,
            "headers": headers,
            "subprotocols": [s for s in subprotocols if s],
            "state": (self._app_state or {}).copy(),
            DETACH: self.detach,
        }
        self._inbox_put({"type": "websocket.connect"})
        task = self._loop.create_task(self._run_asgi(accept))
        self._server_state.tasks.add(task)
        task.add_done_callback(self._server_state.tasks.discard)

    def _refuse(
        self, status: int, reason: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        if self._state != _HANDSHAKE:
            return
        self._state = _CLOSED
        self.transport.write(
            http_response(status, [*self._default_headers(), *(headers or ())], reason.encode())
        )
        self.transport.close()

    def _default_headers(self) -> list[tuple[bytes, bytes]]:
        return [(n.lower(), v) for n, v in self._server_state.default_headers]

    async def _run_asgi(self, accept: bytes) -> None:
        scope = self.scope
        assert scope is not None
        try:
            await self._app(scope, self._receive, self._make_send(accept))
        except ClientDisconnected:
            pass
        except BaseException:
            log.exception("Exception in ASGI application\n")
            self._refuse(500, "Internal Server Error")
            if self._state == _OPEN:
                self.close(INTERNAL_ERROR, "internal error")
        else:
            if self._state == _HANDSHAKE:
                log.error("ASGI callable returned without completing handshake.")
                self._refuse(500, "Internal Server Error")
            elif not self._detached and self._state == _OPEN:
                self.close(CLOSE_NORMAL)
        finally:
            # Detached or done: the handshake's state goes (most of a connection's memory).
            self.scope = None
            self._config = self._app_state = self._app = None

    # ---- detaching -----------------------------------------------------------------------

    def detach(self, handler: WireHandler) -> Wire:
        """From the app, after `websocket.accept`: `handler` gets this connection's messages
        from now on, and the ASGI call may return without closing it. The handler is called
        from the next round of the event loop on (so the caller has the returned `Wire` in
        hand first), starting with what arrived before, in order."""
        if self._state == _HANDSHAKE:
            raise RuntimeError("detach after websocket.accept")
        self._detached = True
        self._loop.call_soon(self._attach, handler)
        return self

    def _attach(self, handler: WireHandler) -> None:
        try:
            self._attach_now(handler)
        except Exception as exc:
            self._failed("attaching", exc)

    def _attach_now(self, handler: WireHandler) -> None:
        inbox, self._inbox = self._inbox or deque(), None
        self._handler = handler
        for message in inbox:
            if message["type"] == "websocket.disconnect":
                self._handler = None
                handler.on_closed(message.get("code", CLOSE_ABNORMAL))
                return
            if message["type"] != "websocket.receive" or self._handler is None:
                continue
            if message.get("text") is not None:
                handler.on_text(message["text"])
            else:
                handler.on_binary(message["bytes"])
        if self._state in (_OPEN, _CLOSING) and self._handler is not None:
            if not self._held:
                self.transport.resume_reading()  # paused while the inbox held messages
            self._read_frames()

    # ---- Wire: what a detached handler writes with ---------------------------------------

    @property
    def writable(self) -> bool:
        return self._writable and self._state == _OPEN

    def send_texts(self, payloads: list[bytes]) -> None:
        """Text frames of UTF-8 `payloads`, in one write."""
        if self._state == _OPEN:
            if len(payloads) == 1:
                self.transport.write(text_frame(payloads[0]))
            else:
                self.transport.write(b"".join([text_frame(p) for p in payloads]))

    def close(self, code: int, reason: str = "") -> None:
        if self._state != _OPEN:
            return
        self._state = _CLOSING
        self.transport.write(close_frame(code, reason))
        self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self._close_timed_out)
        self.transport.resume_reading()  # the client's answering close must be read

    def _close_timed_out(self) -> None:
        self._close_timer = None
        self.transport.abort()  # its buffer may hold data a client never reads

    def pause_reading(self) -> None:
        self._held = True
        if self._state == _OPEN:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self._held = False
        if self._state in (_OPEN, _CLOSING):
            self.transport.resume_reading()

    # ---- receiving -----------------------------------------------------------------------

    def _read_frames(self) -> None:
        reader = self._reader
        while self._state in (_OPEN, _CLOSING):
            try:
                message = reader.read()
            except WireError as exc:
                self._fail(exc.code, exc.reason)
                return
            if message is None:
                return
            opcode, payload = message
            if opcode in (OP_TEXT, OP_BINARY):
                if self._state != _OPEN:
                    continue  # past our close: only the client's close matters
                if self._handler is None:
                    key = "text" if opcode == OP_TEXT else "bytes"
                    self._inbox_put({"type": "websocket.receive", key: payload})
                    self.transport.pause_reading()  # until the app takes it
                elif opcode == OP_TEXT:
                    self._handler.on_text(cast(str, payload))
                else:
                    self._handler.on_binary(cast(bytes, payload))
            elif opcode == OP_PING:
                if self._state == _OPEN:
                    self.transport.write(frame(OP_PONG, cast(bytes, payload)))
            elif opcode == OP_CLOSE:
                try:
                    code, _ = parse_close(cast(bytes, payload))
                except WireError as exc:
                    self._fail(exc.code, exc.reason)
                    return
                if self._state == _OPEN:
                    # Answer with the same code (RFC 6455 5.5.1); 1005 is never sent.
                    self.transport.write(close_frame(code if code != 1005 else CLOSE_NORMAL))
                self._state = _CLOSED
                self.transport.close()
                self._closed(code)
                return

    def _fail(self, code: int, reason: str) -> None:
        """The client broke the protocol: close with `code` at once."""
        log.info("WebSocket closed with %d: %s", code, reason)
        if self._state == _OPEN:
            self.transport.write(close_frame(code, reason))
        self._state = _CLOSED
        self.transport.close()
        self._closed(code)

    def _closed(self, code: int) -> None:
        """Tell whoever owns the connection, once: the handler, or the app's `receive`."""
        handler, self._handler = self._handler, None
        self._reader = FrameReader(0)  # its buffer may be large; nothing is read any more
        if handler is not None:
            handler.on_closed(code)
        elif self._inbox is not None:
            self._inbox_put({"type": "websocket.disconnect", "code": code})

    # ---- the plain ASGI mode ---------------------------------------------------------------

    def _inbox_put(self, message: dict[str, Any]) -> None:
        if self._inbox is not None:
            self._inbox.append(message)
            self._wake()

    def _wake(self) -> None:
        """Wake every waiter (`receive` and each `send`); each checks its own condition."""
        waiting, self._waiting = self._waiting, []
        for future in waiting:
            if not future.done():
                future.set_result(None)

    async def _wait(self) -> None:
        future = self._loop.create_future()
        self._waiting.append(future)
        try:
            await future
        finally:
            if future in self._waiting:  # cancelled before it was woken
                self._waiting.remove(future)

    async def _receive(self) -> dict[str, Any]:
        while True:
            inbox = self._inbox
            if inbox is None:
                raise RuntimeError("receive after detach")
            if inbox:
                message = inbox.popleft()
                if not inbox and self._state in (_OPEN, _CLOSING):
                    self.transport.resume_reading()
                return message
            if self._state == _CLOSED:
                return {"type": "websocket.disconnect", "code": CLOSE_ABNORMAL}
            await self._wait()

    def _make_send(self, accept: bytes) -> Any:
        async def send(message: dict[str, Any]) -> None:
            kind = message["type"]
            if self._state == _HANDSHAKE:
                if kind == "websocket.accept":
                    headers = [*self._default_headers(), *message.get("headers", [])]
                    if message.get("subprotocol"):
                        headers.append((b"sec-websocket-protocol", message["subprotocol"].encode()))
                    self._state = _OPEN
                    self.transport.write(switching_protocols(accept, headers))
                    self._log_handshake("[accepted]")
                    self._read_frames()  # frames that came with the upgrade
                elif kind == "websocket.close":
                    self._log_handshake("403")
                    self._refuse(403, "")
                    self._closed(CLOSE_ABNORMAL)
                else:
                    raise RuntimeError(
                        f"Expected ASGI message 'websocket.accept' or 'websocket.close', "
                        f"but got {kind!r}."
                    )
                return
            while self._state == _OPEN and not self._writable:
                await self._wait()  # back-pressure: the transport's buffer is full
            if self._state != _OPEN:
                raise ClientDisconnected()
            if kind == "websocket.send":
                if message.get("bytes") is not None:
                    self.transport.write(frame(OP_BINARY, message["bytes"]))
                else:
                    self.transport.write(text_frame(message["text"].encode()))
            elif kind == "websocket.close":
                self.close(message.get("code", CLOSE_NORMAL), message.get("reason") or "")
            else:
                raise RuntimeError(f"unexpected ASGI message {kind!r} on an open WebSocket")

        return send

    def _log_handshake(self, outcome: str) -> None:
        scope = self.scope
        if scope is not None and log.isEnabledFor(logging.INFO):
            client = scope.get("client")
            where = f"{client[0]}:{client[1]}" if client else "-"
            log.info('%s - "WebSocket %s" %s', where, scope["path"], outcome)


__all__ = ["DETACH", "GOING_AWAY", "Wire", "WireHandler", "WireProtocol"]
