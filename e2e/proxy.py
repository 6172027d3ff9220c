"""A TCP proxy on loopback that a test can break: the network between browser and server.

`TcpProxy` forwards 127.0.0.1:<its port> to a server port, byte for byte, on an asyncio
loop in its own thread. The test drives it from the outside:

- `cut("fin")` closes every open connection gracefully (FIN both ways), `cut("rst")`
  resets them (SO_LINGER 0, then close); either way new connections are reset at once
  (the server looks down) until `heal()`. The browser sees a WebSocket close 1006 in
  milliseconds (FIELD-NOTES.md).
- `black_hole()` stops moving bytes while every socket stays open, and new connections
  are accepted (the kernel completes the handshake) but nothing goes through: no event
  at all reaches the page; only an application heartbeat can find it.
- `heal()` forwards again. Bytes held during a black hole are delivered then, as TCP
  retransmission would after a real outage.

Bounded: at most `MAX_CONNECTIONS` at once (more are reset), reads of `CHUNK` bytes, and
every call from the test waits at most `CALL_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, Literal

MAX_CONNECTIONS: Final = 64
CHUNK: Final = 64 * 1024
CALL_TIMEOUT: Final = 10.0
CONNECT_TIMEOUT: Final = 5.0

FORWARDING: Final = "forwarding"
REFUSING: Final = "refusing"  # after a cut: the server looks down
BLACK_HOLE: Final = "black hole"

Cut = Literal["fin", "rst"]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN: linger on, with a zero timeout."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    """One proxied connection: the browser's side and the server's side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]


class TcpProxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.upstream_port = upstream_port
        self.port = 0
        self.state = FORWARDING
        self.accepted = 0  # connections accepted so far, for tests that count reconnects
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()  # one per accepted connection
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- what a test calls (from its own thread) ---------------------------------------

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CALL_TIMEOUT)
        self._loop.close()

    def cut(self, how: Cut) -> None:
        """Close every open connection (FIN or RST) and refuse new ones until `heal`."""
        self._call(self._cut(how))

    def black_hole(self) -> None:
        """Stop forwarding; keep every socket open; accept new ones but forward nothing."""
        self._call(self._set(BLACK_HOLE))

    def heal(self) -> None:
        self._call(self._set(FORWARDING))

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT)

    # ---- on the proxy's loop -------------------------------------------------------------

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, self.host, 0, limit=CHUNK)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._cut("rst")
        # Each handler returns once its pumps ended; none is left pending on a closed loop.
        async with asyncio.timeout(CALL_TIMEOUT / 2):
            await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _set(self, state: str) -> None:
        assert self._flowing is not None
        self.state = state
        if state == BLACK_HOLE:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def _cut(self, how: Cut) -> None:
        await self._set(REFUSING)
        links, self._links = list(self._links), set()
        for link in links:
            for writer in link.writers():
                if how == "rst":
                    _reset(writer)
                else:
                    writer.close()
        # The pumps end; each connection's handler then returns by itself.
        tasks = [t for link in links for t in link.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.state == REFUSING or len(self._links) >= MAX_CONNECTIONS:
            _reset(writer)
            return
        link = _Link(writer)
        self._links.add(link)
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            await self._run(link, reader)
        except (TimeoutError, OSError):
            pass  # the server went away, or never answered: the browser sees the close
        finally:
            self._links.discard(link)
            self._handlers.discard(handler)
            for w in link.writers():
                w.close()

    async def _run(self, link: _Link, client: asyncio.StreamReader) -> None:
        assert self._flowing is not None
        await self._flowing.wait()  # a black hole holds the connection before it reaches out
        if link not in self._links:
            return  # cut while held
        async with asyncio.timeout(CONNECT_TIMEOUT):
            upstream, link.upstream = await asyncio.open_connection(
                self.host, self.upstream_port, limit=CHUNK
            )
        pumps = [
            asyncio.create_task(self._pump(client, link.upstream)),
            asyncio.create_task(self._pump(upstream, link.client)),
        ]
        link.tasks += pumps
        try:
            # Either side ending ends the link: a half-open proxy would hide a close.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        while True:
            await self._flowing.wait()
            data = await reader.read(CHUNK)
            if not data:
                return
            # Bytes read just before a black hole began are held too.
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()
