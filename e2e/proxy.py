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
- `start_chaos(rate, seconds)` cuts single connections picked at random, at random times
  (`rate` cuts per second on average), for at most `seconds`, while every other
  connection and new ones go on working: a FIN or a RST, and in a share of the cuts only a
  prefix of the next bytes from the server gets through before the cut, so the client sees
  a WebSocket frame broken off in its middle. `stop_chaos()` ends it and returns how many
  cuts of each kind were made (`cuts`).

Bounded: at most `max_connections` at once (more are reset), reads of `CHUNK` bytes, cuts
for at most the `seconds` given, and every call from the test waits at most `CALL_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

MAX_CONNECTIONS: Final = 64
CHUNK: Final = 64 * 1024
CALL_TIMEOUT: Final = 10.0
CONNECT_TIMEOUT: Final = 5.0
# A mid-frame cut waits for the server's next bytes at most this long, then cuts anyway.
MID_FRAME_WAIT: Final = 0.5

FORWARDING: Final = "forwarding"
REFUSING: Final = "refusing"  # after a cut: the server looks down
BLACK_HOLE: Final = "black hole"

Cut = Literal["fin", "rst"]
T = TypeVar("T")


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
    # Set by a mid-frame cut: the next bytes from the server are cut short, then this cut.
    cut_mid_frame: Cut | None = None

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]


class TcpProxy:
    def __init__(
        self, upstream_port: int, host: str = "127.0.0.1", max_connections: int = MAX_CONNECTIONS
    ) -> None:
        self.host = host
        self.upstream_port = upstream_port
        self.max_connections = max_connections
        self.port = 0
        self.state = FORWARDING
        self.accepted = 0  # connections accepted so far, for tests that count reconnects
        # Single connections cut by the chaos, per kind: "fin", "rst", "fin mid-frame", ...
        self.cuts: Counter[str] = Counter()
        self._chaos: asyncio.Task[None] | None = None
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

    def start_chaos(
        self,
        rate: float,
        seconds: float,
        seed: int | None = None,
        kinds: Sequence[Cut] = ("fin", "rst"),
        mid_frame: float = 0.5,
    ) -> None:
        """Cut one random connection at a time, `rate` cuts per second on average (random
        intervals), for at most `seconds`; a `mid_frame` share of the cuts lets only part
        of the server's next bytes through first. Returns at once."""
        if rate <= 0 or seconds <= 0 or not kinds or not 0 <= mid_frame <= 1:
            raise ValueError("chaos needs rate > 0, seconds > 0, some kinds, 0 <= mid_frame <= 1")
        self._call(self._start_chaos(rate, seconds, random.Random(seed), tuple(kinds), mid_frame))

    def stop_chaos(self) -> Counter[str]:
        """End the chaos (if running); the cuts made so far, per kind."""
        return self._call(self._stop_chaos())

    @property
    def cuts_made(self) -> int:
        return sum(self.cuts.values())

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT)

    # ---- on the proxy's loop -------------------------------------------------------------

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, self.host, 0, limit=CHUNK)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._stop_chaos()
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

    # ---- chaos: single connections cut at random -----------------------------------------

    async def _start_chaos(
        self,
        rate: float,
        seconds: float,
        rng: random.Random,
        kinds: tuple[Cut, ...],
        mid_frame: float,
    ) -> None:
        await self._stop_chaos()
        self._chaos = asyncio.create_task(self._chaos_loop(rate, seconds, rng, kinds, mid_frame))

    async def _stop_chaos(self) -> Counter[str]:
        task, self._chaos = self._chaos, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return Counter(self.cuts)

    async def _chaos_loop(
        self,
        rate: float,
        seconds: float,
        rng: random.Random,
        kinds: tuple[Cut, ...],
        mid_frame: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while (wait := rng.expovariate(rate)) < until - loop.time():
            await asyncio.sleep(wait)
            # Only links that reach the server and are not being cut already.
            live = [
                link
                for link in self._links
                if link.upstream is not None and link.cut_mid_frame is None
            ]
            if not live:
                continue
            link, how = rng.choice(live), rng.choice(kinds)
            if rng.random() < mid_frame:
                link.cut_mid_frame = how
                # A connection that stays silent is cut whole after a while.
                loop.call_later(MID_FRAME_WAIT, self._cut_link, link, how, how)
            else:
                self._cut_link(link, how, how)

    def _cut_link(self, link: _Link, how: Cut, kind: str) -> None:
        """Cut one connection both ways; its handler then ends by itself."""
        if link not in self._links:
            return  # already cut, or closed by either side
        self._links.discard(link)
        self.cuts[kind] += 1
        for writer in link.writers():
            if how == "rst":
                _reset(writer)
            else:
                writer.close()
        for task in link.tasks:
            task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.state == REFUSING or len(self._links) >= self.max_connections:
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
            asyncio.create_task(self._pump(upstream, link.client, link)),
        ]
        link.tasks += pumps
        try:
            # Either side ending ends the link: a half-open proxy would hide a close.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        downstream: _Link | None = None,
    ) -> None:
        """Copy bytes one way; `downstream` is the link when these bytes go to the client
        (where a mid-frame cut breaks them off)."""
        assert self._flowing is not None
        while True:
            await self._flowing.wait()
            data = await reader.read(CHUNK)
            if not data:
                return
            # Bytes read just before a black hole began are held too.
            await self._flowing.wait()
            how = downstream.cut_mid_frame if downstream is not None else None
            if downstream is not None and how is not None and len(data) > 1:
                # Part of what the server sent, then the cut: a frame broken off mid-way.
                writer.write(data[: len(data) // 2])
                self._cut_link(downstream, how, f"{how} mid-frame")
                return
            writer.write(data)
            await writer.drain()
