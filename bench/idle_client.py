"""A process that holds many idle WebSocket connections for `bench/idle.py`.

`python -m bench.idle_client --dialect tokenwire --source 127.0.0.2 URL [URL ...]` then
reads commands on stdin, one per line, and answers each with one JSON line on stdout:

- `open N`: open N more connections (round robin over the URLs), at most `--in-flight`
  handshakes at a time, each bounded by `--connect-timeout`; answers when all are
  established or failed: `{"open": .., "opened": .., "failed": .., "seconds": ..}`.
- `stats`: `{"open": .., "pings": .., "closed": .., "failed": ..}`.
- `quit`: close every connection and exit.

The process exits by itself after `--max-seconds` or when stdin closes, so it never
outlives the bench.

Deliberately not the `websockets` client: a connection here is one asyncio `Protocol`
and a few hundred bytes, so the client costs the shared CPU little next to the server
under test. It speaks just enough RFC 6455: the upgrade, unmasked server frames, masked
client frames (with an all-zero mask, which leaves the payload as is), pings answered
with pongs and a close frame ended. Per dialect, a connection counts as established when:

- `tokenwire` (and `bare`, which speaks the same frames): the `hello` frame arrived;
  each `{"type":"ping","t":..}` is answered with `{"type":"pong","t":..}`.
- `socketio` (Engine.IO 4 over WebSocket): the namespace connect (`40...`) arrived after
  the client's `40`; each Engine.IO ping `2` is answered with `3`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from typing import Final
from urllib.parse import SplitResult, urlsplit

from bench.load import KINDS, Wire

PING_T: Final = re.compile(rb'"type"\s*:\s*"ping"\s*,\s*"t"\s*:\s*(-?\d+)')


class Stats:
    def __init__(self) -> None:
        self.open = 0
        self.opened = 0
        self.failed = 0
        self.closed = 0  # closed by the server after being established
        self.pings = 0


class IdleConnection:
    """One held connection: `bench.load.Wire` moves the bytes; this answers heartbeats."""

    __slots__ = ("dialect", "established", "ready", "stats", "wire")

    def __init__(self, dialect: str, stats: Stats, url: SplitResult, path: str) -> None:
        self.dialect = dialect
        self.stats = stats
        self.wire = Wire(url.hostname or "127.0.0.1", url.port or 80, path, None, self.on_message)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.established = False
        self.wire.closed.add_done_callback(self._lost)

    def on_message(self, wire: Wire, payload: bytes, now: float) -> None:
        if self.dialect == "socketio":
            if payload == b"2":
                self.stats.pings += 1
                self.wire.send_text(b"3")
            elif payload.startswith(b"0{"):
                self.wire.send_text(b"40")
            elif payload.startswith(b"40"):
                self._established()
            return
        if not self.established and b'"hello"' in payload:
            self._established()
            return
        match = PING_T.search(payload)
        if match is not None:
            self.stats.pings += 1
            self.wire.send_text(b'{"type":"pong","t":' + match.group(1) + b"}")

    def _established(self) -> None:
        if not self.established:
            self.established = True
            self.stats.open += 1
            self.stats.opened += 1
            if not self.ready.done():
                self.ready.set_result(None)

    def _lost(self, _: object) -> None:
        if self.established:
            self.stats.open -= 1
            self.stats.closed += 1
        elif not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before established"))


class Holder:
    def __init__(self, args: argparse.Namespace) -> None:
        self.dialect: str = args.dialect
        self.source: str = args.source
        self.in_flight: int = args.in_flight
        self.timeout: float = args.connect_timeout
        self.targets = [urlsplit(u) for u in args.urls]
        self.stats = Stats()
        self.connections: list[IdleConnection] = []
        self._next = 0

    async def _open_one(self) -> None:
        target = self.targets[self._next % len(self.targets)]
        self._next += 1
        host, port = target.hostname or "127.0.0.1", target.port or 80
        path = target.path or "/"
        if target.query:
            path += "?" + target.query
        loop = asyncio.get_running_loop()
        made: list[IdleConnection] = []

        def factory() -> Wire:
            made.append(IdleConnection(self.dialect, self.stats, target, path))
            return made[0].wire

        try:
            async with asyncio.timeout(self.timeout):
                await loop.create_connection(factory, host, port, local_addr=(self.source, 0))
                await made[0].wire.open
                await made[0].ready
        except (OSError, TimeoutError, ConnectionError):
            self.stats.failed += 1
            if made and made[0].wire.transport is not None:
                made[0].wire.transport.abort()
            return
        self.connections.append(made[0])

    async def open(self, count: int) -> dict[str, float]:
        opened_before, failed_before = self.stats.opened, self.stats.failed
        started = time.perf_counter()
        slots = asyncio.Semaphore(self.in_flight)

        async def one() -> None:
            async with slots:
                await self._open_one()

        # Bounded: `count` tasks, each bounded by the connect timeout.
        await asyncio.gather(*(one() for _ in range(count)))
        return {
            "open": self.stats.open,
            "opened": self.stats.opened - opened_before,
            "failed": self.stats.failed - failed_before,
            "seconds": time.perf_counter() - started,
        }

    def close_all(self) -> None:
        for c in self.connections:
            if c.wire.transport is not None:
                c.wire.transport.abort()
        self.connections.clear()


async def serve(args: argparse.Namespace) -> None:
    holder = Holder(args)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(value: dict[str, float]) -> None:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()

    try:
        async with asyncio.timeout(args.max_seconds):
            while line := (await reader.readline()).decode().strip():
                command, _, arg = line.partition(" ")
                if command == "open":
                    answer(await holder.open(int(arg)))
                elif command == "stats":
                    s = holder.stats
                    answer(
                        {"open": s.open, "pings": s.pings, "closed": s.closed, "failed": s.failed}
                    )
                elif command == "quit":
                    break
                else:
                    answer({"error": 1})
    except TimeoutError:
        pass
    finally:
        holder.close_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("urls", nargs="+")
    parser.add_argument("--dialect", choices=KINDS, required=True)
    parser.add_argument("--source", default="127.0.0.1", help="loopback source address")
    parser.add_argument("--in-flight", type=int, default=64, help="handshakes at once")
    parser.add_argument("--connect-timeout", type=float, default=20.0)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args()
    if not args.source.startswith("127."):
        parser.error("--source must be a loopback address (127.0.0.0/8)")
    for url in args.urls:
        host = urlsplit(url).hostname or ""
        if not host.startswith("127."):
            parser.error(f"only loopback targets are allowed (got {url})")
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
    try:
        import uvloop

        uvloop.run(serve(args))
    except ImportError:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
