"""The stream-log contract: the seq-numbered tokens of every stream, kept after `done`.

The log is the truth about a stream. Live fan-out (the broker) is only a wake-up; anyone
who missed something reads it here by seq. Keys are opaque strings built by the chat
service (they include the owner, so one user's request id never meets another's).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import msgspec

from backend.protocol import StreamEnd
from backend.storage.broker.base import Broker, Event

DEFAULT_READ_LIMIT = 512


class StreamExpired(Exception):
    """The stream's log is gone (expired after `done`, or lost with its process)."""


class StreamFull(Exception):
    """An append would exceed the log's bound in tokens."""


class StreamSlice(msgspec.Struct, frozen=True):
    """Tokens `after + 1 .. after + len(tokens)`; `end` is set only when the slice reaches
    the stream's end, so a reader that queues `tokens` and then `end` has delivered it all."""

    tokens: list[str]
    end: StreamEnd | None
    last_seq: int  # the stream's highest seq at the time of the read


class StreamLog(ABC):
    """Contract: seqs are 1, 2, 3, ... without holes; `append` after `finish` is refused;
    a finished stream stays readable for `ttl` seconds, then `read_after` raises
    `StreamExpired`, as it does for a key that never existed."""

    @abstractmethod
    async def create(self, key: str) -> None:
        """Start an empty stream (idempotent for a running stream)."""

    @abstractmethod
    async def append(self, key: str, tokens: Sequence[str]) -> int:
        """Append tokens in order; returns the seq of the last. Raises `StreamFull` past the
        bound (appending nothing) and `StreamExpired` if the stream is unknown or ended."""

    async def append_and_publish(
        self,
        key: str,
        tokens: Sequence[str],
        broker: Broker,
        channel: str,
        event: Callable[[int], Event],
    ) -> int:
        """`append`, then publish `event(seq of the last token)` on `channel`, as
        `broker.publish` would (at most once). Nothing is published when the append raises.
        A log kept where the broker is may do both in one step (one round trip)."""
        seq = await self.append(key, tokens)
        await broker.publish(channel, event(seq))
        return seq

    @abstractmethod
    async def finish(self, key: str, end: StreamEnd, ttl: float) -> None:
        """Record the end; the log expires `ttl` seconds from now."""

    @abstractmethod
    async def read_after(
        self, key: str, after: int, limit: int = DEFAULT_READ_LIMIT
    ) -> StreamSlice:
        """At most `limit` tokens with seq > `after`, in order."""

    @abstractmethod
    def __len__(self) -> int:
        """Streams held now (for metrics)."""

    async def aclose(self) -> None:
        """Stop background work and release connections."""
