"""`GET /ws`: one WebSocket connection, driven by the pure `Outbox` and the chat service.

Each connection owns exactly these tasks, all ended when it closes: the receive loop (the
handler itself), a sender draining the outbox, a heartbeat, and at most one log fill per
stream. Whatever ends first (client gone, heartbeat timeout, slow consumer, shutdown)
closes the connection and the rest are cancelled and awaited; the broker subscription is
closed last. The `Hub` knows every live connection, for metrics and for the 1001 sent to
all on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any, Final

from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect
from litestar.types import WebSocketSendEvent

from backend.broker import Event, StreamEnded, Subscription, UserMessage, user_channel
from backend.chat import ChatError
from backend.outbox import Offer, Outbox
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
    ServerFrame,
    TokenFrame,
    decode_client_frame,
    encode_text,
    error_frame,
)
from backend.security import origin_allowed
from backend.streams.base import DEFAULT_READ_LIMIT

if TYPE_CHECKING:
    from backend.app import Runtime

log = logging.getLogger(__name__)

# A close frame to a client that does not read may never leave; stop waiting after this.
CLOSE_TIMEOUT: Final = 2.0
_connection_ids = itertools.count(1)


class Hub:
    """The live connections of this process."""

    def __init__(self) -> None:
        self.connections: set[Connection] = set()
        self.draining = False

    async def close_all(self, code: int, reason: str, timeout: float) -> None:
        """Ask every connection to close with `code`; wait for them, at most `timeout`."""
        self.draining = True
        connections = list(self.connections)
        for conn in connections:
            conn.request_close(code, reason)
        if connections:
            await asyncio.wait(
                [asyncio.create_task(c.closed.wait()) for c in connections], timeout=timeout
            )


class Connection:
    def __init__(self, socket: WebSocket[Any, Any, Any], runtime: Runtime, user: str) -> None:
        self.socket = socket
        self.runtime = runtime
        self.settings = runtime.settings
        self.chat = runtime.chat
        self.user = user
        self.name = f"{self.settings.node}/{next(_connection_ids)}"
        self.outbox = Outbox(self.settings.outbox_bytes)
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._close_requested = asyncio.Event()
        self._close_code = CLOSE_GOING_AWAY
        self._close_reason = ""
        self._last_received = time.monotonic()
        self._fills: dict[str, asyncio.Task[None]] = {}
        self._subscription: Subscription | None = None
        self.closed = asyncio.Event()

    # ---- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        hub = self.runtime.hub
        hub.connections.add(self)
        try:
            self._subscription = await self.runtime.broker.subscribe(
                user_channel(self.user), self._on_event
            )
            self._send(
                HelloFrame(
                    session=self.name, node=self.settings.node, heartbeat=self.settings.heartbeat
                )
            )
            if hub.draining:
                self.request_close(CLOSE_GOING_AWAY, "server shutting down")
            await self._supervise()
        finally:
            for task in self._fills.values():
                task.cancel()
            await asyncio.gather(*self._fills.values(), return_exceptions=True)
            if self._subscription is not None:
                await self._subscription.close()
            hub.connections.discard(self)
            self.closed.set()

    async def _supervise(self) -> None:
        tasks = {
            asyncio.create_task(self._receive_loop(), name=f"{self.name} receive"),
            asyncio.create_task(self._send_loop(), name=f"{self.name} send"),
            asyncio.create_task(self._heartbeat(), name=f"{self.name} heartbeat"),
            asyncio.create_task(self._close_requested.wait(), name=f"{self.name} close"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        client_gone = any(
            t.get_name().endswith("receive") and not t.cancelled() and t.exception() is None
            for t in done
        )
        if self._close_requested.is_set() or not client_gone:
            await self._close()

    def request_close(self, code: int, reason: str = "") -> None:
        if not self._close_requested.is_set():
            self._close_code, self._close_reason = code, reason
            self._close_requested.set()

    async def _close(self) -> None:
        # The close frame queues behind unsent data; a client that never reads would keep
        # us here forever, so the wait is bounded. uvicorn then closes the transport.
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.socket.close(code=self._close_code, reason=self._close_reason)

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
                self._send(error_frame(BAD_FRAME, "binary frames are not accepted; send JSON text"))
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
            self._send(exc.frame)
            return
        try:
            if isinstance(frame, ChatFrame):
                accepted = await self.chat.start(
                    self.user, frame.id, frame.conversation, frame.text, origin=self.name
                )
                after = 0 if accepted.new else frame.after
                self._deliver(
                    frame.id, after, AckFrame(id=frame.id, conversation=accepted.conversation)
                )
            elif isinstance(frame, ResumeFrame):
                # Ownership and expiry are checked by the fill's first read.
                self._deliver(frame.id, frame.after)
            elif isinstance(frame, CancelFrame):
                await self.chat.cancel(self.user, frame.id)
            elif isinstance(frame, PingFrame):
                self._send(PongFrame(t=frame.t))
            # PongFrame: receiving it is the point (`_last_received`).
        except ChatError as exc:
            self._send(exc.frame)

    # ---- delivering ----------------------------------------------------------------------

    def _send(self, frame: ServerFrame, stream: str | None = None) -> None:
        if self._close_requested.is_set():
            return  # closing: nothing more is queued, so memory stays bounded
        self.outbox.push(frame, stream)
        self._after_queue()

    def _deliver(self, stream: str, after: int, first: ServerFrame | None = None) -> None:
        """(Re)send `stream` from `after + 1` to the end, then live; `first` goes before."""
        self.outbox.follow(stream, after)
        if first is not None:
            self._send(first, stream)
        self._start_fill(stream)

    def _on_event(self, event: Event) -> None:
        """Broker listener: called on the event loop for every event of this user."""
        if self._close_requested.is_set():
            return
        if isinstance(event, TokenFrame):
            offer = self.outbox.offer_token(event.id, event.seq, event.data)
        elif isinstance(event, StreamEnded):
            offer = self.outbox.offer_end(event.id, event.seq, event.frame)
        elif isinstance(event, UserMessage):
            if event.origin != self.name:
                self._send(event.frame)
            return
        if offer is Offer.GAP:
            self._start_fill(event.id)
        self._after_queue()

    def _start_fill(self, stream: str) -> None:
        running = self._fills.get(stream)
        if running is not None and not running.done():
            running.cancel()  # a newer `follow` restarted the stream: its read position moved
        self._fills[stream] = asyncio.create_task(
            self._fill(stream), name=f"{self.name} fill {stream}"
        )

    async def _fill(self, stream: str) -> None:
        """Copy the stream from the log into the outbox until caught up with live frames."""
        try:
            while True:
                while not self.outbox.has_room_for_fill:
                    self._room.clear()
                    await self._room.wait()
                after = self.outbox.last_seq(stream)
                piece = await self.chat.read_after(self.user, stream, after, DEFAULT_READ_LIMIT)
                if not self.outbox.is_filling(stream):
                    return  # abandoned while we read
                self.outbox.fill(stream, piece.tokens, piece.end)
                self._after_queue()
                caught_up = piece.end is not None or len(piece.tokens) < DEFAULT_READ_LIMIT
                if caught_up and self.outbox.finish_fill(stream):
                    return
        except ChatError as exc:
            self.outbox.abandon(stream, exc.frame)
            self._after_queue()
        finally:
            if self._fills.get(stream) is asyncio.current_task():
                del self._fills[stream]

    def _after_queue(self) -> None:
        if self.outbox.overflowed:
            if not self._close_requested.is_set():
                self.runtime.metrics.slow_consumer_closes += 1
            self.request_close(CLOSE_SLOW_CONSUMER, "slow consumer: reconnect and resume")
            return
        self._wake.set()

    async def _send_loop(self) -> None:
        send = self.socket.send
        while True:
            frame = self.outbox.pop()
            if frame is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.outbox.has_room_for_fill:
                self._room.set()
            await send(
                WebSocketSendEvent(type="websocket.send", text=encode_text(frame), bytes=None)
            )

    async def _heartbeat(self) -> None:
        interval, timeout = self.settings.heartbeat, self.settings.heartbeat_timeout
        while True:
            await asyncio.sleep(interval)
            sent = time.monotonic()
            self._send(PingFrame(t=int(time.time() * 1000)))
            await asyncio.sleep(timeout)
            if self._last_received < sent:
                self.runtime.metrics.heartbeat_timeouts += 1
                self.request_close(CLOSE_HEARTBEAT_TIMEOUT, "heartbeat timeout")
                return


@websocket("/ws")
async def ws_endpoint(socket: WebSocket[Any, Any, Any]) -> None:
    runtime: Runtime = socket.app.state.runtime
    if not origin_allowed(socket.scope, runtime.settings.allowed_origins):
        # Before accept, uvicorn answers the upgrade with 403.
        await socket.close(code=CLOSE_POLICY, reason="origin not allowed")
        return
    await socket.accept()
    user: str = socket.scope["state"]["user"]
    await Connection(socket, runtime, user).run()
