"""`GET /api/streams/<id>`: one stream as Server-Sent Events, the WebSocket's twin.

The response streams from a `Delivery` limited to that stream, so resume, gap filling,
coalescing and the slow-client bound are the WebSocket's own. Each frame is one event:
`event:` its type, `data:` the same JSON as on the WebSocket, `id:` the seq on `token`
and `done`, so a browser's EventSource resumes by itself through `Last-Event-ID`.

The response ends after the stream's `done` or `error`, when the client is too slow (it
reconnects and resumes), or on shutdown. sse-starlette writes the events, the keep-alive
comments, and bounds each send with a timeout.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from typing import Any

from litestar import Request, get
from litestar.datastructures import State
from litestar.types import ASGIApp, Receive, Scope, Send
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError

from backend.delivery.feed import Delivery
from backend.protocol import (
    BAD_FRAME,
    INTERNAL,
    MAX_SEQ,
    DoneFrame,
    ErrorFrame,
    ProtocolError,
    ServerFrame,
    TokenFrame,
    encode_text,
    error_frame,
    frame_type,
)
from backend.runtime import Runtime
from backend.transports.http import checked_id, connect_refusal, user_of

log = logging.getLogger(__name__)
_session_ids = itertools.count(1)


def _after(request: Request[Any, Any, Any]) -> int:
    """Where to start: `Last-Event-ID` (sent by a reconnecting EventSource, which keeps the
    original URL) wins over `?after=`."""
    for field, raw in (
        ("Last-Event-ID", request.headers.get("last-event-id")),
        ("after", request.query_params.get("after")),
    ):
        if raw is None or raw == "":
            continue
        # isascii: str.isdigit() also admits digits int() refuses, such as "²". The length
        # check keeps int() from parsing a huge number before it is compared.
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 16 or int(raw) > MAX_SEQ:
            raise ProtocolError(
                error_frame(BAD_FRAME, f"`{field}` must be a seq: an integer from 0 to {MAX_SEQ}")
            )
        return int(raw)
    return 0


def frame_event(frame: ServerFrame) -> ServerSentEvent:
    """One frame as an SSE event: `event:` its type, `data:` its JSON, `id:` its seq."""
    seq = str(frame.seq) if isinstance(frame, TokenFrame | DoneFrame) else None
    return ServerSentEvent(data=encode_text(frame), event=frame_type(frame), id=seq)


class SseSession:
    """One open SSE response, as the hub sees it."""

    def __init__(self, runtime: Runtime, user: str, stream: str) -> None:
        self.runtime = runtime
        self.stream = stream
        self.delivery = Delivery(
            chat=runtime.chat,
            broker=runtime.broker,
            user=user,
            name=f"{runtime.settings.node}/sse{next(_session_ids)}",
            outbox_bytes=runtime.settings.outbox_bytes,
            on_overflow=self._slow_consumer,
            hub=runtime.hub,
            only_stream=stream,
        )

    def request_close(self, code: int, reason: str = "") -> None:
        self.delivery.stop()

    def _slow_consumer(self) -> None:
        self.runtime.metrics.slow_consumer_closes += 1

    async def events(self, after: int) -> AsyncIterator[ServerSentEvent]:
        """The stream's events. A failure of our own code once the response has started
        ends it with an `internal` error event (retryable: the EventSource may reconnect
        and resume), logged once and counted, instead of a cut connection."""
        hub = self.runtime.hub
        hub.join_sse(self)
        try:
            async with self.delivery:
                self.delivery.deliver(self.stream, after)
                while (frame := await self.delivery.next_frame()) is not None:
                    yield frame_event(frame)
                    if isinstance(frame, DoneFrame | ErrorFrame):
                        return
        except Exception as exc:
            self.runtime.metrics.contained_failures.add("http")
            log.error(
                "SSE response of %s failed; ended it with internal", self.stream, exc_info=exc
            )
            yield frame_event(
                error_frame(INTERNAL, "internal server error; reconnect", self.stream)
            )
        finally:
            hub.leave_sse(self)


@get("/api/streams/{stream_id:str}")
async def stream_events(request: Request[Any, Any, Any], state: State, stream_id: str) -> ASGIApp:
    runtime: Runtime = state.runtime
    refusal = await connect_refusal(runtime, request.scope)
    if refusal is not None:
        runtime.metrics.connections_refused += 1
        raise ProtocolError(refusal)
    user = user_of(request)
    after = _after(request)
    try:
        # Refuse an unknown or expired stream with a status, before the stream starts.
        await runtime.chat.read_after(user, checked_id(stream_id), after, 0)
    except ProtocolError as exc:
        raise ProtocolError(exc.frame) from None
    session = SseSession(runtime, user, stream_id)
    s = runtime.settings
    response = EventSourceResponse(
        session.events(after),
        ping=s.sse_keepalive,
        # A client that cannot take one event within a heartbeat period is gone.
        send_timeout=s.heartbeat + s.heartbeat_timeout,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # A send that timed out left the response unfinished; uvicorn closes the socket.
        with contextlib.suppress(SendTimeoutError):
            await response(scope, receive, send)  # type: ignore[arg-type]

    return app
