"""The live clients of this process (WebSocket connections and SSE responses), for metrics
and for shutdown, which tells each of them to go away and waits, bounded, until they have."""

from __future__ import annotations

import asyncio
from typing import Protocol


class LiveClient(Protocol):
    closed: asyncio.Event

    def request_close(self, code: int, reason: str = "") -> None: ...


class Hub:
    def __init__(self) -> None:
        self.websockets: set[LiveClient] = set()
        self.sse: set[LiveClient] = set()
        self.draining = False

    async def close_all(self, code: int, reason: str, timeout: float) -> None:
        """Ask every client to close (WebSockets with `code`); wait at most `timeout`."""
        self.draining = True
        clients = [*self.websockets, *self.sse]
        for client in clients:
            client.request_close(code, reason)
        if clients:
            waits = [asyncio.create_task(c.closed.wait()) for c in clients]
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for task in pending:
                task.cancel()
