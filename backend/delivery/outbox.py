"""One connection's outgoing frames: bounded, coalescing, and exact per stream. No I/O.

The outbox is where "nothing lost, nothing repeated" is enforced on the server side. For
every stream the connection delivers it remembers the last `seq` queued, so that:

- a live token at `last + 1` is queued, and joined into the stream's pending token frame
  when the socket has not taken that frame yet (a slow client gets fewer, larger frames);
- a live token at or below `last` is a duplicate and dropped;
- a live token beyond `last + 1` is a gap: the stream switches to *filling* and the shell
  reads the missing tokens from the stream log, which is the truth; live tokens seen while
  filling are held back (only their highest seq is remembered) and read from the log too.

Catch-up from the log (`fill`) is flow controlled by the shell (`has_room_for_fill`);
live tokens are not, so a client that stops reading pushes `pending_bytes` over the bound
and `overflowed` tells the shell to close with 4001. The client then resumes from the log.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final

from backend.protocol import ErrorFrame, MessageFrame, ServerFrame, StreamEnd, TokenFrame

# A frame costs this much beyond its text; keeps many tiny frames from looking free.
FRAME_OVERHEAD: Final = 48
MAX_ENDED_STREAMS: Final = 256


class Offer(Enum):
    QUEUED = "queued"
    DUPLICATE = "duplicate"
    GAP = "gap"  # the caller must start a fill of this stream
    HELD = "held"  # a fill is running; it will deliver this from the log
    IGNORED = "ignored"  # a stream this connection does not deliver


class _Entry:
    # A plain class with slots: one is made per frame queued, the hottest allocation here.
    __slots__ = ("frame", "n", "parts", "seq", "size", "stream")

    def __init__(self, stream: str | None, frame: ServerFrame | None, size: int) -> None:
        self.stream = stream
        self.frame = frame  # None for a token entry, built on pop from `parts`
        self.parts: list[str] = []
        self.seq = 0
        self.n = 0  # tokens in `parts` (a part may hold several: a joined live event)
        self.size = size


@dataclass(eq=False)
class _Stream:
    last: int
    filling: bool = False
    held: int = 0
    end_held: bool = False  # an end arrived while filling: the fill must read it from the log
    ended: bool = False
    tail: _Entry | None = None  # pending token entry that new tokens may join


class Outbox:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.pending_bytes = 0
        self.overflowed = False
        self._entries: deque[_Entry] = deque()
        self._streams: dict[str, _Stream] = {}
        self._ended: deque[str] = deque()  # streams in the order they ended

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def has_room_for_fill(self) -> bool:
        # Catch-up reads wait at half the bound, so replay alone never overflows.
        return self.pending_bytes < self.max_bytes // 2

    def last_seq(self, stream: str) -> int:
        state = self._streams.get(stream)
        return state.last if state else 0

    def is_filling(self, stream: str) -> bool:
        state = self._streams.get(stream)
        return state is not None and state.filling

    # ---- control frames -------------------------------------------------------------

    def push(self, frame: ServerFrame, stream: str | None = None) -> None:
        """Queue a frame that is not part of a stream's token sequence (ack, ping, ...)."""
        if stream is not None and (state := self._streams.get(stream)):
            state.tail = None  # keep order: later tokens must not join a frame before this
        self._append(_Entry(stream=None, frame=frame, size=_size(frame)))

    # ---- stream delivery --------------------------------------------------------------

    def expect(self, stream: str) -> None:
        """A stream just started (announced by its user message): deliver it from seq 1."""
        if stream not in self._streams:
            self._streams[stream] = _Stream(last=0)

    def follow(self, stream: str, after: int) -> None:
        """(Re)deliver `stream` from `after + 1`: drop its queued tokens and end, then fill.

        The caller starts a fill right after; until it finishes, live frames are held.
        """
        kept: deque[_Entry] = deque()
        for entry in self._entries:
            if entry.stream == stream:
                self.pending_bytes -= entry.size
            else:
                kept.append(entry)
        # Rebuilt rather than marked: a client resuming over and over while not reading
        # must not grow the queue.
        self._entries = kept
        self._streams[stream] = _Stream(last=after, filling=True, held=after)
        self._forget_ended()

    def offer_token(self, stream: str, seq: int, data: str, n: int = 1) -> Offer:
        """A live event of `n` tokens joined in `data`, the last of them `seq`."""
        state = self._streams.get(stream)
        if state is None:
            if seq != n:
                # A stream that began before this connection knew of it: the client asks
                # for it with `resume`. Forwarding it from here would race that resume and
                # make the client see overlapping frames.
                return Offer.IGNORED
            state = self._streams[stream] = _Stream(last=0)
        if state.ended:
            return Offer.DUPLICATE
        if state.filling:
            state.held = max(state.held, seq)
            return Offer.HELD
        if seq <= state.last:
            return Offer.DUPLICATE
        if seq - n != state.last:
            # A hole before it, or an event that overlaps what was queued (the joined text
            # cannot be cut at token boundaries): the log has the tokens one by one.
            state.filling, state.held = True, seq
            return Offer.GAP
        self._queue_tokens(stream, state, (data,), seq, n, len(data))
        return Offer.QUEUED

    def offer_end(self, stream: str, seq: int, frame: StreamEnd) -> Offer:
        """A stream ended after token `seq` with `frame` (done, or an error of the stream)."""
        state = self._streams.get(stream)
        if state is None:
            return Offer.IGNORED  # see offer_token
        if state.ended:
            return Offer.DUPLICATE
        if state.filling:
            state.held, state.end_held = max(state.held, seq), True
            return Offer.HELD
        if seq > state.last:
            state.filling, state.held = True, seq
            return Offer.GAP
        self._queue_end(stream, state, frame)
        self._forget_ended()
        return Offer.QUEUED

    def fill(self, stream: str, tokens: Sequence[str], end: StreamEnd | None) -> None:
        """Queue tokens read from the log right after `last_seq(stream)`, then `end` if the
        read reached the stream's end."""
        state = self._streams[stream]
        if tokens:
            count = len(tokens)
            size = sum(map(len, tokens))
            self._queue_tokens(stream, state, tokens, state.last + count, count, size, join=False)
        if end is not None:
            self._queue_end(stream, state, end)

    def finish_fill(self, stream: str) -> bool:
        """True when the fill has caught up with everything seen live; else read again."""
        state = self._streams[stream]
        if not state.ended and (state.held > state.last or state.end_held):
            return False
        state.filling = False
        return True

    def open_streams(self) -> list[str]:
        """Streams delivered here that have not ended."""
        return [name for name, state in self._streams.items() if not state.ended]

    def recheck(self, stream: str) -> bool:
        """Read the log again from `last_seq` (a publish may have been lost, the end
        included): True if the caller must start a fill; False if one runs or it ended."""
        state = self._streams.get(stream)
        if state is None or state.ended or state.filling:
            return False
        state.filling, state.held = True, state.last
        return True

    def abandon(self, stream: str, frame: ErrorFrame) -> None:
        """End a stream that cannot be delivered (its log expired): `frame` says why."""
        self.follow(stream, self.last_seq(stream))
        state = self._streams[stream]
        state.filling = False
        self._queue_end(stream, state, frame)

    def _forget_ended(self) -> None:
        """Keep the state of at most MAX_ENDED_STREAMS ended streams: enough to drop late
        duplicates, bounded for a connection that lives through many answers."""
        while len(self._ended) > MAX_ENDED_STREAMS:
            stream = self._ended.popleft()
            state = self._streams.get(stream)
            if state is not None and state.ended:
                del self._streams[stream]

    # ---- the sender's side -------------------------------------------------------------

    def pop(self) -> ServerFrame | None:
        while self._entries:
            entry = self._entries.popleft()
            self.pending_bytes -= entry.size
            if entry.frame is not None:
                return entry.frame
            assert entry.stream is not None  # token entries always name their stream
            state = self._streams.get(entry.stream)
            if state is not None and state.tail is entry:
                state.tail = None
            parts = entry.parts
            data = parts[0] if len(parts) == 1 else "".join(parts)
            return TokenFrame(id=entry.stream, seq=entry.seq, data=data, n=entry.n)
        return None

    # ---- internals ---------------------------------------------------------------------

    def _queue_tokens(
        self,
        stream: str,
        state: _Stream,
        parts: Sequence[str],
        seq: int,
        count: int,
        size: int,
        join: bool = True,
    ) -> None:
        """Queue `count` tokens, the last `seq`, as `parts` of `size` characters in all."""
        entry = state.tail if join else None
        if entry is None:
            entry = _Entry(stream=stream, frame=None, size=FRAME_OVERHEAD)
            self._append(entry)
            state.tail = entry
            self.pending_bytes += FRAME_OVERHEAD
        entry.parts.extend(parts)
        entry.seq = seq
        entry.n += count
        entry.size += size
        state.last = seq
        self.pending_bytes += size
        if self.pending_bytes > self.max_bytes:
            self.overflowed = True

    def _queue_end(self, stream: str, state: _Stream, frame: StreamEnd) -> None:
        state.ended, state.tail = True, None
        self._ended.append(stream)
        entry = _Entry(stream=stream, frame=frame, size=_size(frame))
        self._append(entry)

    def _append(self, entry: _Entry) -> None:
        self._entries.append(entry)
        if entry.frame is not None:
            self.pending_bytes += entry.size
            if self.pending_bytes > self.max_bytes:
                self.overflowed = True


def _size(frame: ServerFrame) -> int:
    """Roughly the encoded size: the overhead plus the free-text fields."""
    if isinstance(frame, ErrorFrame):
        return FRAME_OVERHEAD + len(frame.message)
    if isinstance(frame, MessageFrame):
        return FRAME_OVERHEAD + len(frame.text)
    return FRAME_OVERHEAD
