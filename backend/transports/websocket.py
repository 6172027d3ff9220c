"""`GET /ws`: one WebSocket connection: client frames in, a `Delivery`'s frames out.

Two shells around one `Connection`, chosen by the server the app runs in:

- `WireConnection`, under tokenwire's own WebSocket protocol (`backend.transports.wsserver`,
  what `python -m backend` serves with): once accepted, the connection detaches from the
  ASGI call and has no task at all while idle. The protocol calls it for each message;
  frames the delivery queues are written straight to the transport as they are queued
  (on the process's flush tick under load, `backend.delivery.flush`). A frame that needs
  to wait (a chat's acceptance, a cancel) runs in a task of its own, and the frames after
  it wait their turn, so frames are handled in order.
- `TaskConnection`, under any other ASGI server: it receives in the task the server runs
  it in and owns one more task, the sender draining the delivery.

Either way, whatever ends first (client gone, heartbeat timeout, slow consumer, shutdown)
closes the connection, the rest is cancelled and awaited, and the broker subscription is
closed last. The `Hub` knows every live client (WebSocket connections and SSE responses),
for admission, metrics and the shutdown, which tells each to go away; its one heartbeat
sweep pings every connection and closes the silent ones with 4000, so an idle connection
has no task or timer of its own.

Failures of our own code are contained where they happen (PROTOCOL.md: bad input never
breaks a connection, and neither may a bug): an exception while one client frame is
handled answers that frame with `internal` (retryable) and the connection carries on; an
exception in the connection's own machinery closes that connection with 1011. Each is
logged once, with the connection's context, and counted in `/metrics`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Final

from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect
from litestar.types import WebSocketSendEvent

from backend.delivery.feed import Delivery
from backend.protocol import (
    BAD_FRAME,
    CLOSE_GOING_AWAY,
    CLOSE_HEARTBEAT_TIMEOUT,
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY,
    CLOSE_SLOW_CONSUMER,
    INTERNAL,
    AckFrame,
    CancelFrame,
    ChatFrame,
    ClientFrame,
    HelloFrame,
    PingFrame,
    PongFrame,
    ProtocolError,
    ResumeFrame,
    decode_client_frame,
    encode,
    encode_text,
    error_frame,
    frame_type,
)
from backend.runtime import Runtime
from backend.transports.http import connect_refusal
from backend.transports.wsserver import DETACH, Wire
from backend.web.logs import bind
from backend.web.security import origin_allowed

log = logging.getLogger(__name__)

# A close frame to a client that does not read may never leave; stop waiting after this.
CLOSE_TIMEOUT: Final = 2.0
BINARY_REFUSED: Final = "binary frames are not accepted; send JSON text"
FRAME_FAILED: Final = "the server failed while handling this frame; send it again"
_connection_ids = itertools.count(1)


class Connection(abc.ABC):
    """What both shells share: the client's frames handled, the heartbeat, the close."""

    # Slots: tens of thousands of these live at once; a __dict__ each would cost ~300 bytes.
    __slots__ = (
        "_close_code",
        "_close_reason",
        "_close_requested",
        "_last_received",
        "chat",
        "delivery",
        "name",
        "runtime",
        "settings",
        "user",
    )

    def __init__(
        self, runtime: Runtime, user: str, on_ready: Callable[[], None] | None = None
    ) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.chat = runtime.chat
        self.user = user
        self.name = f"{self.settings.node}/{next(_connection_ids)}"
        self.delivery = Delivery(
            chat=runtime.chat,
            broker=runtime.broker,
            user=user,
            name=self.name,
            outbox_bytes=self.settings.outbox_bytes,
            on_overflow=self._slow_consumer,
            hub=runtime.hub,
            on_ready=on_ready,
        )
        self._close_requested = False
        self._close_code = CLOSE_GOING_AWAY
        self._close_reason = ""
        self._last_received = time.monotonic()

    def _join(self) -> None:
        """Join the hub and queue `hello`: before the broker subscription exists, since
        events of the user's streams may arrive as soon as it does, and `hello` is the
        first frame of every connection."""
        s = self.settings
        self.runtime.hub.join_websocket(self, s.heartbeat, s.heartbeat_timeout)
        self.delivery.push(
            HelloFrame(
                session=self.name,
                node=s.node,
                heartbeat=s.heartbeat,
                heartbeat_timeout=s.heartbeat_timeout,
            )
        )

    @abc.abstractmethod
    def request_close(self, code: int, reason: str = "") -> None:
        """Close with `code` (heartbeat timeout, slow consumer, shutdown): each shell its way."""

    def _slow_consumer(self) -> None:
        self.runtime.metrics.slow_consumer_closes += 1
        self.request_close(CLOSE_SLOW_CONSUMER, "slow consumer: reconnect and resume")

    # ---- heartbeat (driven by the hub's one sweep) -----------------------------------------

    def ping(self, t: int) -> None:
        self.delivery.push(PingFrame(t=t))

    def silent_since(self, sent: float) -> bool:
        return self._last_received < sent and not self._close_requested

    def timed_out(self) -> None:
        self.runtime.metrics.heartbeat_timeouts += 1
        self.request_close(CLOSE_HEARTBEAT_TIMEOUT, "heartbeat timeout")

    # ---- the client's frames -------------------------------------------------------------

    def _decode(self, text: str) -> ClientFrame | None:
        """The frame in `text`, or None when it is invalid (its error frame is queued)."""
        try:
            frame = decode_client_frame(
                text,
                max_bytes=self.settings.max_frame_bytes,
                max_text=self.settings.max_text_chars,
            )
        except ProtocolError as exc:
            self.delivery.push(exc.frame)
            return None
        bind(stream=getattr(frame, "id", None))  # log lines (and a generation's) name it
        return frame

    def _take(self, text: str) -> tuple[ClientFrame, Coroutine[Any, Any, None]] | None:
        """Decode and handle `text`; what must wait is returned with its frame, to be awaited
        by `_finish`. A failure is contained: the frame is answered `internal`."""
        frame = None
        try:
            frame = self._decode(text)
            if frame is None:
                return None
            pending = self._dispatch(frame)
        except Exception as exc:
            self._frame_failed(frame, exc)
            return None
        return None if pending is None else (frame, pending)

    async def _finish(self, frame: ClientFrame, pending: Coroutine[Any, Any, None]) -> None:
        try:
            await pending
        except Exception as exc:  # a cancel (the connection closing) goes on
            self._frame_failed(frame, exc)

    def _frame_failed(self, frame: ClientFrame | None, exc: Exception) -> None:
        """One client frame could not be handled: say so for that frame (its stream, if it
        started one, is left as it is), log it once, and carry on."""
        self.runtime.metrics.contained_failures.add("frame")
        kind = frame_type(frame) if frame is not None else "client"
        log.error(
            "connection %s: a %s frame failed; answered internal", self.name, kind, exc_info=exc
        )
        self.delivery.push(error_frame(INTERNAL, FRAME_FAILED, getattr(frame, "id", None)))

    def _connection_failed(self, where: str, exc: BaseException) -> None:
        """The connection's own machinery failed: log it once and close with 1011."""
        self.runtime.metrics.contained_failures.add("connection")
        log.error("connection %s failed %s; closing it with 1011", self.name, where, exc_info=exc)
        self.request_close(CLOSE_INTERNAL_ERROR, "internal error; reconnect")

    def _dispatch(self, frame: ClientFrame) -> Coroutine[Any, Any, None] | None:
        """Handle `frame`; what must wait (a storage round trip) is returned, to await."""
        if isinstance(frame, ChatFrame):
            return self._chat(frame)
        if isinstance(frame, CancelFrame):
            return self._cancel(frame)
        if isinstance(frame, ResumeFrame):
            self.delivery.deliver(frame.id, frame.after)
        elif isinstance(frame, PingFrame):
            self.delivery.push(PongFrame(t=frame.t))
        # PongFrame: receiving it is the point (`_last_received`).
        return None

    async def _chat(self, frame: ChatFrame) -> None:
        try:
            accepted = await self.chat.start(
                self.user, frame.id, frame.conversation, frame.text, origin=self.name
            )
        except ProtocolError as exc:
            self.delivery.push(exc.frame)
            return
        if not accepted.new:
            self.runtime.metrics.replays += 1
        log.info("chat %s", "started" if accepted.new else "replayed")
        self.delivery.deliver(
            frame.id,
            0 if accepted.new else frame.after,
            AckFrame(id=frame.id, conversation=accepted.conversation),
        )

    async def _cancel(self, frame: CancelFrame) -> None:
        try:
            await self.chat.cancel(self.user, frame.id)
        except ProtocolError as exc:
            self.delivery.push(exc.frame)


class WireConnection(Connection):
    """A connection detached from its ASGI call (`backend.transports.wsserver`): no task
    while idle. Frames the delivery queues are written at once (under load, on the flush
    tick); the client's frames are handled as they arrive, and one that must wait holds the
    ones after it in `_waiting` until it is done."""

    __slots__ = ("_busy", "_context", "_waiting", "wire")

    def __init__(self, runtime: Runtime, user: str) -> None:
        super().__init__(runtime, user, on_ready=self._flush)
        self.wire: Wire | None = None
        self._context: contextvars.Context | None = None  # the log context of its lines
        self._busy: asyncio.Task[None] | None = None  # handling a frame that must wait
        self._waiting: deque[str] | None = None  # frames received meanwhile, in order

    async def attach(self, detach: Callable[[WireConnection], Wire]) -> None:
        """In the ASGI call, after the accept: subscribe, then detach from the call."""
        bind(conn=self.name)
        self._join()
        try:
            await self.delivery.__aenter__()
        except BaseException:
            self.runtime.hub.leave_websocket(self)
            raise
        self._context = contextvars.copy_context()
        self.wire = detach(self)
        if self.runtime.hub.draining:
            self.request_close(CLOSE_GOING_AWAY, "server shutting down")
        self._flush()

    def request_close(self, code: int, reason: str = "") -> None:
        if self._close_requested:
            return
        self._close_requested = True
        self._close_code, self._close_reason = code, reason
        self.delivery.stop()  # what is still queued is not sent: the client resumes it
        if self.wire is not None:
            self.wire.close(code, reason)  # `on_closed` follows

    # ---- sending ---------------------------------------------------------------------------

    def _flush(self) -> None:
        """Write what the delivery queued, at once: the delivery calls this when frames
        wait (once, until they are taken), so tokens are joined only by the process's flush
        tick under load (`backend.delivery.flush`), and nothing waits for another loop round.

        Contained here, not by the caller: it runs in whatever queued the frame (a broker
        event of a generation, another connection's frame), which must not fail with it."""
        wire = self.wire
        if wire is None:
            return
        payloads = []
        pop = self.delivery.pop_frame
        try:
            while wire.writable and (frame := pop()) is not None:
                payloads.append(encode(frame))
            if payloads:
                wire.send_texts(payloads)
        except Exception as exc:
            self._connection_failed("while writing", exc)

    # ---- WireHandler: what the protocol calls ----------------------------------------------

    # Each runs in the connection's log context, and none lets an exception reach the
    # protocol (asyncio would call it a fatal error of the transport and drop the socket
    # without a close frame): `_run` contains it.

    def on_text(self, text: str) -> None:
        self._last_received = time.monotonic()
        if self._busy is not None:
            if self._waiting is None:
                self._waiting = deque()
            self._waiting.append(text)
            return
        self._run("while handling a frame", self._handle, text)

    def on_binary(self, data: bytes) -> None:
        self._last_received = time.monotonic()
        self._run(
            "while refusing a binary frame",
            self.delivery.push,
            error_frame(BAD_FRAME, BINARY_REFUSED),
        )

    def on_writable(self) -> None:
        self._flush()

    def on_closed(self, code: int) -> None:
        self.wire = None
        self._run("while closing", self._on_closed)

    def _run(self, where: str, call: Callable[..., None], *args: Any) -> None:
        assert self._context is not None
        try:
            self._context.run(call, *args)
        except Exception as exc:
            self._context.run(self._connection_failed, where, exc)

    def _on_closed(self) -> None:
        self.delivery.stop()
        busy, self._busy = self._busy, None
        if busy is not None:
            busy.cancel()  # a chat's acceptance goes on: the chat service shields it
        self._waiting = None
        _owned(asyncio.create_task(self._closed(busy), name=f"{self.name} closed"))

    async def _closed(self, busy: asyncio.Task[None] | None) -> None:
        try:
            if busy is not None:
                await asyncio.gather(busy, return_exceptions=True)
            await self.delivery.__aexit__(None, None, None)
        finally:
            self.runtime.hub.leave_websocket(self)

    # ---- the client's frames ---------------------------------------------------------------

    def _handle(self, text: str) -> None:
        """In the connection's log context: handle `text` now, or start its task."""
        taken = self._take(text)
        if taken is None:
            return
        if self.wire is None:
            taken[1].close()
            return
        self.wire.pause_reading()  # the frames after it wait in the kernel meanwhile
        self._busy = asyncio.create_task(self._handle_in_order(*taken))

    async def _handle_in_order(
        self, frame: ClientFrame, pending: Coroutine[Any, Any, None]
    ) -> None:
        try:
            await self._finish(frame, pending)
            while self._waiting:
                if (later := self._take(self._waiting.popleft())) is not None:
                    await self._finish(*later)
        except Exception as exc:
            self._connection_failed("while handling frames in order", exc)
        finally:
            if self._busy is asyncio.current_task():
                self._busy = None
                self._waiting = None
                if self.wire is not None:
                    self.wire.resume_reading()


class TaskConnection(Connection):
    """A connection in the ASGI call of a server that cannot detach it: it receives in
    that task and sends in one of its own."""

    __slots__ = ("_interrupting", "_task", "socket")

    def __init__(self, socket: WebSocket[Any, Any, Any], runtime: Runtime, user: str) -> None:
        super().__init__(runtime, user)
        self.socket = socket
        self._task: asyncio.Task[Any] | None = None  # the receiving task, while it receives
        self._interrupting = False

    async def run(self) -> None:
        """Receive in this task, send in one of its own; whichever ends first ends the
        other. A close request (heartbeat timeout, slow consumer, shutdown) or the sender
        ending interrupts the receiving by cancelling this task (`_interrupt`)."""
        bind(conn=self.name)  # every log line of this connection's tasks names it
        hub = self.runtime.hub
        self._join()
        try:
            async with self.delivery:
                if hub.draining:
                    self.request_close(CLOSE_GOING_AWAY, "server shutting down")
                sender = asyncio.create_task(self._send_loop(), name=f"{self.name} send")
                sender.add_done_callback(self._sender_ended)
                client_gone = False
                try:
                    if not self._close_requested and not sender.done():
                        self._task = asyncio.current_task()
                        await self._receive_loop()
                        client_gone = True
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    # Our own interrupt only: a cancel from outside (the server stopping)
                    # goes on.
                    if not self._interrupting or task is None or task.uncancel() > 0:
                        raise
                except Exception as exc:
                    self._connection_failed("while receiving", exc)
                finally:
                    self._task = None
                    sender.remove_done_callback(self._sender_ended)
                    sender.cancel()
                    await asyncio.gather(sender, return_exceptions=True)
                if self._close_requested or not client_gone:
                    await self._close()
        finally:
            hub.leave_websocket(self)

    def _interrupt(self) -> None:
        if self._task is not None and not self._interrupting:
            self._interrupting = True
            self._task.cancel()

    def _sender_ended(self, sender: asyncio.Task[None]) -> None:
        if not sender.cancelled() and (exc := sender.exception()) is not None:
            self._connection_failed("while sending", exc)
        self._interrupt()

    def request_close(self, code: int, reason: str = "") -> None:
        if not self._close_requested:
            self._close_requested = True
            self._close_code, self._close_reason = code, reason
            self._interrupt()

    async def _close(self) -> None:
        # The close frame queues behind unsent data; a client that never reads would keep
        # us here forever, so the wait is bounded. The server then closes the transport.
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.socket.close(code=self._close_code, reason=self._close_reason)

    async def _receive_loop(self) -> None:
        while True:
            try:
                message = await self.socket.receive()
            except WebSocketDisconnect:
                return
            if message["type"] == "websocket.disconnect":
                return
            self._last_received = time.monotonic()
            text = message.get("text")
            if not isinstance(text, str):
                self.delivery.push(error_frame(BAD_FRAME, BINARY_REFUSED))
                continue
            if (taken := self._take(text)) is not None:
                await self._finish(*taken)

    async def _send_loop(self) -> None:
        send = self.socket.send
        while (frame := await self.delivery.next_frame()) is not None:
            await send(
                WebSocketSendEvent(type="websocket.send", text=encode_text(frame), bytes=None)
            )


_closing: set[asyncio.Task[None]] = set()  # the clean-ups of closed wire connections


def _owned(task: asyncio.Task[None]) -> None:
    """Keep a clean-up task referenced until it ends (the hub waits for its `leave`)."""
    _closing.add(task)
    task.add_done_callback(_closing.discard)


@websocket("/ws")
async def ws_endpoint(socket: WebSocket[Any, Any, Any]) -> None:
    runtime: Runtime = socket.app.state.runtime
    if not origin_allowed(socket.scope, runtime.settings.allowed_origins):
        # Before accept, the server answers the upgrade with 403.
        await socket.close(code=CLOSE_POLICY, reason="origin not allowed")
        return
    user: str = socket.scope["state"]["user"]
    refusal = await admission_refusal(runtime, socket, user)
    if refusal is not None:
        runtime.metrics.connections_refused += 1
        # Before accept: the server answers 403 and no open connection is touched.
        await socket.close(code=CLOSE_POLICY, reason=refusal)
        return
    await socket.accept()
    # Under tokenwire's own WebSocket protocol (`python -m backend`): see the docstring.
    detach: Callable[[WireConnection], Wire] | None = socket.scope.get(DETACH)  # type: ignore[assignment]
    try:
        if detach is not None:
            await WireConnection(runtime, user).attach(detach)
        else:
            await TaskConnection(socket, runtime, user).run()
    except Exception as exc:
        # Opening failed (the subscription, say): this connection only, closed with 1011.
        runtime.metrics.contained_failures.add("connection")
        log.error("WebSocket connection failed while opening; closed with 1011", exc_info=exc)
        with contextlib.suppress(Exception):
            await socket.close(code=CLOSE_INTERNAL_ERROR, reason="internal error; reconnect")


async def admission_refusal(
    runtime: Runtime, socket: WebSocket[Any, Any, Any], user: str
) -> str | None:
    """Why this upgrade is refused (the close reason), or None to accept it. Every attempt
    counts against its address's connect bucket. The caps are checked before the upgrade
    is accepted and a connection joins the hub after, so concurrent upgrades may overshoot
    a cap by the few being accepted at that moment."""
    if await connect_refusal(runtime, socket.scope) is not None:
        return "too many connection attempts; retry later"
    s = runtime.settings
    if len(runtime.hub.websockets) >= s.max_connections:
        return "server is at its connection limit; retry later"
    if runtime.hub.connections_of(user) >= s.max_connections_per_user:
        return "too many connections for this user; close one"
    return None
