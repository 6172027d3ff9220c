"""A TCP load balancer on loopback for the multi-node tests, like the one in front of a real
deployment: each new connection goes to the next backend in round robin, bytes are copied
both ways untouched (WebSocket, HTTP, SSE alike), and when either side closes, both do.

A backend that refuses the connection (a killed node) is skipped: the next one is tried, so
a client that reconnects after its node died lands on a live one, as behind a real balancer
with health checks. Nothing is sticky: which node a connection lands on is decided per
connection, never per client.

It runs in the event loop of the test that starts it (`async with Balancer(...)`), and
`stop` ends everything it started (the listener and every live pipe) within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterable
from types import TracebackType
from typing import Final

Backend = tuple[str, int]  # (host, port)

HOST: Final = "127.0.0.1"
CONNECT_TIMEOUT: Final = 2.0  # per backend attempt; a refused connection fails at once
STOP_TIMEOUT: Final = 5.0  # the most `stop` waits for pipes and the listener to end
CLOSE_TIMEOUT: Final = 1.0  # the most closing one socket waits for its buffered bytes
CHUNK: Final = 64 * 1024


class Balancer:
    """Round robin over `backends`; `port` is where clients connect once started."""

    def __init__(self, backends: Iterable[Backend], host: str = HOST) -> None:
        self.host = host
        self.port = 0
        self._backends: list[Backend] = list(backends)
        self._next = 0  # round-robin cursor: index of the next backend to try
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.connections = 0  # pipes open now (client connected to a backend)
        self.accepted = 0  # client connections accepted so far
        self.refused = 0  # backend connection attempts that failed
        self.rejected = 0  # client connections closed because no backend took them
        self.routed: Counter[Backend] = Counter()  # connections forwarded, per backend

    # ---- configuration ---------------------------------------------------------------

    @property
    def backends(self) -> list[Backend]:
        return list(self._backends)

    def add(self, backend: Backend) -> None:
        """Put `backend` back in the rotation (new connections only)."""
        if backend not in self._backends:
            self._backends.append(backend)

    def remove(self, backend: Backend) -> None:
        """Take `backend` out of the rotation; its live connections are left alone, as a
        balancer draining a node does."""
        if backend in self._backends:
            self._backends.remove(backend)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Close the listener and every live pipe; returns within about STOP_TIMEOUT."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        pipes = list(self._pipes)
        for task in pipes:
            task.cancel()
        if pipes:
            await asyncio.wait(pipes, timeout=STOP_TIMEOUT)
        if server is not None:
            # Python 3.12+ waits here for the connections the server accepted; they were
            # all closed above, and the bound keeps a stuck one from hanging the test.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), STOP_TIMEOUT)

    async def __aenter__(self) -> Balancer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ---- one client connection -------------------------------------------------------

    def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # A task of our own, not the one asyncio would wrap a coroutine callback in: `stop`
        # cancels it, and Python 3.11 logs an error for a cancelled callback task.
        self.accepted += 1
        task = asyncio.create_task(self._serve(client_r, client_w))
        self._pipes.add(task)
        task.add_done_callback(self._pipes.discard)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        backend_w: asyncio.StreamWriter | None = None
        try:
            found = await self._connect_backend()
            if found is None:
                self.rejected += 1
                return
            backend_r, backend_w, backend = found
            self.routed[backend] += 1
            self.connections += 1
            try:
                await self._pipe(client_r, client_w, backend_r, backend_w)
            finally:
                self.connections -= 1
        finally:
            await _close(client_w)
            if backend_w is not None:
                await _close(backend_w)

    async def _connect_backend(
        self,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Backend] | None:
        """Open a connection to the next backend that accepts one; None if none does.
        Each backend of the rotation is tried at most once, in round-robin order."""
        for _ in range(len(self._backends)):
            if not self._backends:
                break
            backend = self._backends[self._next % len(self._backends)]
            self._next = (self._next + 1) % len(self._backends)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    reader, writer = await asyncio.open_connection(*backend)
            except (OSError, TimeoutError):
                self.refused += 1
                continue
            return reader, writer, backend
        return None

    async def _pipe(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        backend_r: asyncio.StreamReader,
        backend_w: asyncio.StreamWriter,
    ) -> None:
        """Copy both ways until either side closes (or fails), then stop both copies."""
        copies = {
            asyncio.create_task(_copy(client_r, backend_w)),
            asyncio.create_task(_copy(backend_r, client_w)),
        }
        try:
            await asyncio.wait(copies, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for copy in copies:
                copy.cancel()
            await asyncio.wait(copies, timeout=CLOSE_TIMEOUT)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Forward bytes until EOF or a connection error on either end."""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close one socket, flushing what is buffered for at most CLOSE_TIMEOUT."""
    writer.close()
    with contextlib.suppress(ConnectionError, OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
