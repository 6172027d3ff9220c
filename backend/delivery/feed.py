"""Feeding one client's outbox from the broker and the stream log, for any transport.

A `Delivery` is what a WebSocket connection or an SSE response streams from: it listens
to the user's broker channel, offers every event to its `Outbox`, runs the log reads
(fills) that close gaps and serve resumes, and hands frames to the transport one at a
time with `next_frame`. The transports only move those frames onto their sockets, so the
exactly-once logic exists once.

Live events are only the fast path (a Redis hiccup may lose some): a watch re-reads the
log of every stream that made no progress for a while, so a lost token or end is found,
and asks the chat service to check the producer of one silent for longer, so a stream
whose node died ends with an error instead of hanging.

Owned tasks: at most one fill per stream, cancelled and awaited on exit. The watch is no
task of its own: the `Hub`'s one watch sweep calls `watch` on every delivery (an idle
connection then costs no task and no timer). The broker subscription is closed on exit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from types import TracebackType

from backend.chat.service import ChatService
from backend.delivery.flush import ticker
from backend.delivery.hub import Hub
from backend.delivery.lean_event import CallbackEvent, LeanEvent
from backend.delivery.outbox import Offer, Outbox
from backend.protocol import (
    INTERNAL,
    NOT_FOUND,
    STREAM_EXPIRED,
    ProtocolError,
    ServerFrame,
    TokenFrame,
    error_frame,
)
from backend.storage.broker import (
    Broker,
    Event,
    StreamEnded,
    Subscription,
    UserMessage,
    user_channel,
)
from backend.storage.streams.base import DEFAULT_READ_LIMIT

# Bounds of the watch's period (half a lease): often enough to notice a lost publish or a
# dead producer soon, rarely enough to cost nothing.
EXPIRED_MESSAGE = "this answer is no longer available; send the message again"
FILL_FAILED = "the server failed while sending this answer; resume it"

log = logging.getLogger(__name__)
MIN_WATCH = 0.1
MAX_WATCH = 5.0


class Delivery:
    # Slots: one per connection, tens of thousands at once; a __dict__ each costs ~600 bytes.
    __slots__ = (
        "_fills",
        "_hub",
        "_on_overflow",
        "_only_stream",
        "_progress",
        "_room",
        "_subscription",
        "_ticker",
        "_wake",
        "_watched",
        "broker",
        "chat",
        "name",
        "outbox",
        "stopped",
        "user",
    )

    def __init__(
        self,
        *,
        chat: ChatService,
        broker: Broker,
        user: str,
        name: str,
        outbox_bytes: int,
        on_overflow: Callable[[], None],
        hub: Hub,
        only_stream: str | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """`name` identifies the client (user messages it sent are not echoed back to it);
        `hub` runs the watch sweep; `only_stream` limits delivery to one stream (an SSE
        response). A transport without a task of its own passes `on_ready`: it is called
        when frames wait, once until `pop_frame` finds none (instead of `next_frame`)."""
        self.chat = chat
        self.broker = broker
        self.user = user
        self.name = name
        self.outbox = Outbox(outbox_bytes)
        self._on_overflow = on_overflow
        self._only_stream = only_stream
        self._hub = hub
        self._wake = LeanEvent() if on_ready is None else CallbackEvent(on_ready)
        self._ticker = ticker()  # looked up once: `_after_queue` runs for every token
        self._room = LeanEvent()
        self._fills: dict[str, asyncio.Task[None]] = {}
        self._subscription: Subscription | None = None
        self._progress: dict[str, float] = {}  # stream -> when it last moved here
        self._watched: dict[str, float] = {}  # stream that never moved -> when first watched
        self.stopped = False

    async def __aenter__(self) -> Delivery:
        self._subscription = await self.broker.subscribe(user_channel(self.user), self._on_event)
        lease = self.chat.lease_ttl
        self._hub.watch(self, min(max(lease / 2, MIN_WATCH), MAX_WATCH), lease * 1.5)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopped = True
        self._hub.unwatch(self)
        tasks = list(self._fills.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._subscription is not None:
            await self._subscription.close()

    # ---- what the transport queues -----------------------------------------------------

    def push(self, frame: ServerFrame, stream: str | None = None) -> None:
        if self.stopped:
            return
        self.outbox.push(frame, stream)
        self._after_queue()

    def deliver(self, stream: str, after: int, first: ServerFrame | None = None) -> None:
        """(Re)send `stream` from `after + 1` to its end, then live; `first` goes before.
        Ownership and expiry are checked by the first log read: an unknown stream gets a
        `not_found` error frame, an expired one `stream_expired`."""
        self.outbox.follow(stream, after)
        if first is not None:
            self.push(first, stream)
        self._start_fill(stream)

    def stop(self) -> None:
        """Queue nothing more; `next_frame` returns None from now on."""
        self.stopped = True
        self._wake.set()

    async def next_frame(self) -> ServerFrame | None:
        """The next frame to put on the wire, waiting until there is one; None once stopped
        (the transport then ends: on shutdown, or when the client was too slow)."""
        while not self.stopped:
            frame = self.pop_frame()
            if frame is not None:
                return frame
            await self._wake.wait()
        return None

    def pop_frame(self) -> ServerFrame | None:
        """The next frame to put on the wire, or None (none waits, or stopped): then the
        next frame queued wakes the transport again."""
        frame = None if self.stopped else self.outbox.pop()
        if frame is None:
            self._wake.clear()
            return None
        if self.outbox.has_room_for_fill:
            self._room.set()
        if type(frame) is TokenFrame:
            metrics = self.chat.metrics
            metrics.token_frames_sent += 1
            metrics.tokens_sent += frame.n
        return frame

    # ---- feeding the outbox --------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        """Broker listener: called on the event loop for every event of this user."""
        if self.stopped:
            return
        if isinstance(event, UserMessage):
            if self._only_stream is None:
                self.outbox.expect(event.frame.id)  # its tokens follow from seq 1
                if event.origin != self.name:
                    self.push(event.frame)
            return
        if self._only_stream is not None and event.id != self._only_stream:
            return
        if isinstance(event, TokenFrame):
            offer = self.outbox.offer_token(event.id, event.seq, event.data, event.n)
        elif isinstance(event, StreamEnded):
            offer = self.outbox.offer_end(event.id, event.seq, event.frame)
        else:
            return  # node-channel events are not for clients
        self._progress[event.id] = time.monotonic()
        if offer is Offer.GAP:
            self._start_fill(event.id)
        self._after_queue(joinable=True)

    def _start_fill(self, stream: str) -> None:
        running = self._fills.get(stream)
        if running is not None and not running.done():
            running.cancel()  # a newer `deliver` moved the stream's read position
        self._fills[stream] = asyncio.create_task(
            self._fill(stream), name=f"{self.name} fill {stream}"
        )

    async def _fill(self, stream: str) -> None:
        """Copy the stream from the log into the outbox until caught up with live frames.
        Reads wait while the outbox is half full, so catching up never overflows it."""
        start = self.outbox.last_seq(stream)  # > 0: a client catching up from the log
        try:
            while True:
                while not self.outbox.has_room_for_fill:
                    self._room.clear()
                    await self._room.wait()
                after = self.outbox.last_seq(stream)
                piece = await self.chat.read_after(self.user, stream, after, DEFAULT_READ_LIMIT)
                if self.stopped or not self.outbox.is_filling(stream):
                    return
                self.outbox.fill(stream, piece.tokens, piece.end)
                if piece.tokens or piece.end is not None:
                    self._progress[stream] = time.monotonic()
                self._after_queue()
                caught_up = piece.end is not None or len(piece.tokens) < DEFAULT_READ_LIMIT
                if caught_up and self.outbox.finish_fill(stream):
                    self.chat.metrics.resumes_recovered += start > 0
                    return
        except ProtocolError as exc:
            # Retryable (storage down for a moment): the watch reads again later.
            if not self.stopped and not exc.frame.retryable:
                frame = exc.frame
                if frame.code == NOT_FOUND and stream in self._progress:
                    # This client was shown the stream, so it existed: its log and records
                    # were lost (Redis restarted empty). Say so, not "not yours".
                    frame = error_frame(STREAM_EXPIRED, EXPIRED_MESSAGE, stream)
                self.chat.metrics.resumes_expired += frame.code == STREAM_EXPIRED
                self.outbox.abandon(stream, frame)
                self._after_queue()
        except Exception as exc:
            # A bug: this stream ends for this client (it may resume), the rest goes on.
            if not self.stopped:
                self.chat.metrics.contained_failures.add("delivery")
                log.error(
                    "%s: catching up %s failed; ended it with internal",
                    self.name,
                    stream,
                    exc_info=exc,
                )
                self.outbox.abandon(stream, error_frame(INTERNAL, FILL_FAILED, stream))
                self._after_queue()
        finally:
            if self._fills.get(stream) is asyncio.current_task():
                del self._fills[stream]

    def watch(self, now: float, interval: float, producer_silence: float) -> list[str]:
        """One round of the watch (the hub's sweep calls it every `interval` seconds): read
        the log again for every stream that made no progress for `interval`; returns the
        streams silent for `producer_silence`, whose producer the caller must check."""
        if self.stopped:
            return []
        streams = self.outbox.open_streams()
        if not streams and not self._progress and not self._watched:
            return []  # the idle connection: nothing to look at
        for timing in (self._progress, self._watched):
            for stream in list(timing):
                if stream not in streams:
                    del timing[stream]
        silent = []
        for stream in streams:
            # A stream that never moved is timed apart from `_progress`, which `_fill`
            # reads as "this client was shown it" (else a `not_found` read while the
            # watch ticks would be reported as `stream_expired`).
            since = self._progress.get(stream)
            idle = now - (self._watched.setdefault(stream, now) if since is None else since)
            if idle < interval:
                continue
            running = self._fills.get(stream)
            if running is None and (self.outbox.recheck(stream) or self.outbox.is_filling(stream)):
                self._start_fill(stream)
            if idle >= producer_silence:
                silent.append(stream)
        return silent

    async def check_producer(self, stream: str) -> None:
        await self.chat.check_producer(self.user, stream)

    def _after_queue(self, joinable: bool = False) -> None:
        """Wake the sender; `joinable`: what was queued is live tokens or an end, which may
        wait for the process's flush tick under load (`backend.delivery.flush`)."""
        if self.outbox.overflowed:
            # Nothing more is queued once the transport is told: memory stays bounded.
            self.stop()
            self._on_overflow()
            return
        if joinable:
            self._ticker.wake(self._wake)
        else:
            self._wake.set()
