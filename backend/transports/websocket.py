"""`GET /ws`: one WebSocket connection: client frames in, a `Delivery`'s frames out.

Each connection receives in the task uvicorn runs it in and owns one more task, the
sender draining the delivery (plus the delivery's log fills while it has any). Whatever
ends first (client gone, heartbeat timeout, slow consumer, shutdown) closes the connection
and the rest are cancelled and awaited; the broker subscription is closed last. The `Hub`
knows every live client (WebSocket connections and SSE responses), for admission, metrics
and the shutdown, which tells each to go away; its one heartbeat sweep pings every
connection and closes the silent ones with 4000, so an idle connection has no task or
timer of its own beyond the sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any, Final, cast

from litestar import WebSocket, websocket
from litestar.enums import ScopeType
from litestar.exceptions import WebSocketDisconnect
from litestar.types import ASGIApp, Receive, Scope, Send, WebSocketSendEvent

from backend.chat import ChatError
from backend.delivery import Delivery
from backend.logs import bind
from backend.protocol import (
    BAD_FRAME,
    CLOSE_GOING_AWAY,
    CLOSE_HEARTBEAT_TIMEOUT,
    CLOSE_POLICY,
    CLOSE_SLOW_CONSUMER,
    AckFrame,
    CancelFrame,
    ChatFrame,
    FrameError,
    HelloFrame,
    PingFrame,
    PongFrame,
    ResumeFrame,
    decode_client_frame,
    encode_text,
    error_frame,
)
from backend.security import origin_allowed
from backend.transports.http import connect_refusal

if TYPE_CHECKING:
    from backend.app import Runtime

log = logging.getLogger(__name__)

# A close frame to a client that does not read may never leave; stop waiting after this.
CLOSE_TIMEOUT: Final = 2.0
_connection_ids = itertools.count(1)


class Connection:
    # Slots: tens of thousands of these live at once; a __dict__ each would cost ~300 bytes.
    __slots__ = (
        "_close_code",
        "_close_reason",
        "_close_requested",
        "_interrupting",
        "_last_received",
        "_task",
        "chat",
        "delivery",
        "name",
        "runtime",
        "settings",
        "socket",
        "user",
    )

    def __init__(self, socket: WebSocket[Any, Any, Any], runtime: Runtime, user: str) -> None:
        self.socket = socket
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
        )
        self._close_requested = False
        self._close_code = CLOSE_GOING_AWAY
        self._close_reason = ""
        self._last_received = time.monotonic()
        self._task: asyncio.Task[Any] | None = None  # the receiving task, while it receives
        self._interrupting = False

    # ---- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Receive in this task (uvicorn's), send in one of its own; whichever ends first
        ends the other. A close request (heartbeat timeout, slow consumer, shutdown) or the
        sender ending interrupts the receiving by cancelling this task (`_interrupt`). One
        coroutine for all of it: every frame an idle connection keeps costs ~450 bytes."""
        bind(conn=self.name)  # every log line of this connection's tasks names it
        hub = self.runtime.hub
        hub.join_websocket(self, self.settings.heartbeat, self.settings.heartbeat_timeout)
        try:
            # Queued before the broker subscription exists: events of the user's streams may
            # arrive as soon as it does, and `hello` is the first frame of every connection.
            self.delivery.push(
                HelloFrame(
                    session=self.name,
                    node=self.settings.node,
                    heartbeat=self.settings.heartbeat,
                    heartbeat_timeout=self.settings.heartbeat_timeout,
                )
            )
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
                except Exception:
                    log.exception("connection %s failed while receiving", self.name)
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

    def _sender_ended(self, _: asyncio.Task[None]) -> None:
        self._interrupt()

    def request_close(self, code: int, reason: str = "") -> None:
        if not self._close_requested:
            self._close_requested = True
            self._close_code, self._close_reason = code, reason
            self._interrupt()

    def _slow_consumer(self) -> None:
        self.runtime.metrics.slow_consumer_closes += 1
        self.request_close(CLOSE_SLOW_CONSUMER, "slow consumer: reconnect and resume")

    async def _close(self) -> None:
        # The close frame queues behind unsent data; a client that never reads would keep
        # us here forever, so the wait is bounded. uvicorn then closes the transport.
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.socket.close(code=self._close_code, reason=self._close_reason)

    # ---- heartbeat (driven by the hub's one sweep) -----------------------------------------

    def ping(self, t: int) -> None:
        self.delivery.push(PingFrame(t=t))

    def silent_since(self, sent: float) -> bool:
        return self._last_received < sent and not self._close_requested

    def timed_out(self) -> None:
        self.runtime.metrics.heartbeat_timeouts += 1
        self.request_close(CLOSE_HEARTBEAT_TIMEOUT, "heartbeat timeout")

    # ---- receiving ---------------------------------------------------------------------

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
                self.delivery.push(
                    error_frame(BAD_FRAME, "binary frames are not accepted; send JSON text")
                )
                continue
            await self._handle(text)

    async def _handle(self, text: str) -> None:
        try:
            frame = decode_client_frame(
                text,
                max_bytes=self.settings.max_frame_bytes,
                max_text=self.settings.max_text_chars,
            )
        except FrameError as exc:
            self.delivery.push(exc.frame)
            return
        bind(stream=getattr(frame, "id", None))  # log lines (and a generation's) name it
        try:
            if isinstance(frame, ChatFrame):
                accepted = await self.chat.start(
                    self.user, frame.id, frame.conversation, frame.text, origin=self.name
                )
                if not accepted.new:
                    self.runtime.metrics.replays += 1
                log.info("chat %s", "started" if accepted.new else "replayed")
                self.delivery.deliver(
                    frame.id,
                    0 if accepted.new else frame.after,
                    AckFrame(id=frame.id, conversation=accepted.conversation),
                )
            elif isinstance(frame, ResumeFrame):
                self.delivery.deliver(frame.id, frame.after)
            elif isinstance(frame, CancelFrame):
                await self.chat.cancel(self.user, frame.id)
            elif isinstance(frame, PingFrame):
                self.delivery.push(PongFrame(t=frame.t))
            # PongFrame: receiving it is the point (`_last_received`).
        except ChatError as exc:
            self.delivery.push(exc.frame)

    # ---- sending -------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        # After the accept, every middleware's send wrapper only passes frames on (they
        # add headers to the accept and to HTTP responses): frames go to the server's own
        # send when `edge_send` captured it, ~3 µs less per frame (a profile's figure).
        raw: Send | None = cast(dict[str, Any], self.socket.scope).get(RAW_SEND_KEY)
        send = raw or self.socket.send
        while (frame := await self.delivery.next_frame()) is not None:
            await send(
                WebSocketSendEvent(type="websocket.send", text=encode_text(frame), bytes=None)
            )


RAW_SEND_KEY: Final = "tokenwire.raw_send"


def edge_send(app: ASGIApp) -> ASGIApp:
    """Outside every middleware: keep the server's own `send` of a WebSocket in its scope,
    for the connection's frames after the accept (`Connection._send_loop`)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.WEBSOCKET:
            cast(dict[str, Any], scope)[RAW_SEND_KEY] = send
        await app(scope, receive, send)

    return wrapped


@websocket("/ws")
async def ws_endpoint(socket: WebSocket[Any, Any, Any]) -> None:
    runtime: Runtime = socket.app.state.runtime
    if not origin_allowed(socket.scope, runtime.settings.allowed_origins):
        # Before accept, uvicorn answers the upgrade with 403.
        await socket.close(code=CLOSE_POLICY, reason="origin not allowed")
        return
    user: str = socket.scope["state"]["user"]
    refusal = await admission_refusal(runtime, socket, user)
    if refusal is not None:
        runtime.metrics.connections_refused += 1
        # Before accept: uvicorn answers 403 and no open connection is touched.
        await socket.close(code=CLOSE_POLICY, reason=refusal)
        return
    await socket.accept()
    await Connection(socket, runtime, user).run()


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
