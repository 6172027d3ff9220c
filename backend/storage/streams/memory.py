"""Stream log in this process's memory: the single-node default.

Expired streams are removed lazily on access and by a sweep on every `create`, so no
background task is needed and memory stays bounded by (streams within their ttl) x
(tokens per stream).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from backend.protocol import StreamEnd
from backend.storage.streams.base import (
    DEFAULT_READ_LIMIT,
    StreamExpired,
    StreamFull,
    StreamLog,
    StreamSlice,
)


@dataclass(eq=False)
class _Log:
    tokens: list[str] = field(default_factory=list)
    end: StreamEnd | None = None
    expires: float = float("inf")


class MemoryStreamLog(StreamLog):
    def __init__(self, max_tokens: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_tokens = max_tokens
        self._clock = clock
        self._logs: dict[str, _Log] = {}
        # Finished keys in order of expiry (ttl is the same for all callers in practice;
        # the sweep stops at the first key still alive, so it costs O(expired)).
        self._expiry_order: list[str] = []

    def __len__(self) -> int:
        return len(self._logs)

    async def create(self, key: str) -> None:
        self._sweep()
        if key in self._logs and self._logs[key].end is None:
            return
        self._logs[key] = _Log()

    async def append(self, key: str, tokens: Sequence[str]) -> int:
        log = self._live(key)
        if log.end is not None:
            raise StreamExpired(key)
        if len(log.tokens) + len(tokens) > self._max_tokens:
            raise StreamFull(key)
        log.tokens.extend(tokens)
        return len(log.tokens)

    async def finish(self, key: str, end: StreamEnd, ttl: float) -> None:
        log = self._live(key)
        log.end = end
        log.expires = self._clock() + ttl
        self._expiry_order.append(key)

    async def read_after(
        self, key: str, after: int, limit: int = DEFAULT_READ_LIMIT
    ) -> StreamSlice:
        log = self._live(key)
        tokens = log.tokens[after : after + limit]
        reached_end = after + len(tokens) >= len(log.tokens)
        return StreamSlice(
            tokens=tokens, end=log.end if reached_end else None, last_seq=len(log.tokens)
        )

    def _live(self, key: str) -> _Log:
        log = self._logs.get(key)
        if log is None or log.expires <= self._clock():
            raise StreamExpired(key)
        return log

    def _sweep(self) -> None:
        now = self._clock()
        kept = 0
        for key in self._expiry_order:
            log = self._logs.get(key)
            if log is not None and log.end is not None and log.expires > now:
                break
            if log is not None and log.expires <= now:
                del self._logs[key]
            kept += 1
        del self._expiry_order[:kept]
