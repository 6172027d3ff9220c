"""What streaming costs before any server logic: two floors on one core, measured with no
tokenwire code, so a throughput goal can be checked against the machine it is set for.

- pacing: the demo model's own pacing (`DemoProvider.batches`: one timer wake-up per token,
  the overdue ones together when the loop falls behind) for N streams at 50 tokens/s, the
  tokens thrown away. Every peer of bench/throughput.py runs this same provider.
- writes: one small WebSocket frame written to each of N loopback connections every
  `tick` seconds, by a uvloop process, while a reader process on another core drains them:
  the syscall and the kernel's loopback delivery, which is what one frame costs at least.

Each runs in its own process pinned to the bench's server CPU (the reader on the client
CPUs) when the machine is quiet, as the figures do. `python -m bench.floors` prints both;
bench/results/results.md uses them to say why the throughput goal is out of reach.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Final, cast

import uvloop

from backend.protocol import ChatTurn
from backend.providers.demo import DemoProvider
from bench.common import client_cpus, pinning_note, server_cpus

RATE: Final = 50.0  # tokens/s per stream, as in bench/throughput.py
PARAGRAPHS: Final = 6  # long enough answers that no stream ends while measured
SETTLE: Final = 2.0  # seconds before measuring: every stream started, the loop steady
# A token frame as tokenwire sends it under load (two joined tokens), with its header.
_PAYLOAD: Final = b'{"type":"token","id":"0123456789abcdef","seq":42,"data":" a b","n":2}'
FRAME: Final = bytes([0x81, len(_PAYLOAD)]) + _PAYLOAD
PROCESS_TIMEOUT: Final = 120.0


@dataclass(frozen=True)
class Floor:
    what: str
    per_second: float  # tokens (pacing) or writes (writes) per second
    core_share: float  # CPU of the measured process, in cores
    us_each: float  # µs of CPU per token or per write


def pacing(streams: int, seconds: float) -> Floor:
    """The demo model's pacing for `streams` streams, measured over `seconds`."""
    return _in_process(_pacing, (streams, seconds))


def writes(connections: int, tick: float, seconds: float) -> Floor:
    """One frame to each of `connections` loopback connections every `tick` seconds."""
    return _in_process(_writes, (connections, tick, seconds))


def _in_process(target: Callable[..., None], args: tuple[object, ...]) -> Floor:
    receiving, sending = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.Process(target=target, args=(*args, sending))
    process.start()
    try:
        if not receiving.poll(PROCESS_TIMEOUT):
            raise TimeoutError(f"no floor measured in {PROCESS_TIMEOUT:.0f} s")
        result: Floor = receiving.recv()
        return result
    finally:
        process.kill()
        process.join()


def _pin(cpus: tuple[int, ...]) -> None:
    if cpus:
        os.sched_setaffinity(0, set(cpus))


def _pacing(streams: int, seconds: float, out: Connection) -> None:
    _pin(server_cpus())
    out.send(uvloop.run(_pace(streams, seconds)))


async def _pace(streams: int, seconds: float) -> Floor:
    provider = DemoProvider(first_token_delay=0.0, tokens_per_second=RATE, paragraphs=PARAGRAPHS)
    turns = [ChatTurn(role="user", content="how do streams resume?")]
    produced = 0

    async def stream(index: int) -> None:
        nonlocal produced
        await asyncio.sleep(index / streams)  # starts spread over a second, like the bench
        async for batch in provider.batches(turns):
            if isinstance(batch, list):
                produced += len(batch)

    tasks = [asyncio.create_task(stream(i)) for i in range(streams)]
    try:
        await asyncio.sleep(SETTLE)
        cpu, count, wall = time.process_time(), produced, time.perf_counter()
        await asyncio.sleep(seconds)
        cpu, count = time.process_time() - cpu, produced - count
        wall = time.perf_counter() - wall
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return Floor(f"pacing, {streams} streams", count / wall, cpu / wall, cpu / max(count, 1) * 1e6)


def _writes(connections: int, tick: float, seconds: float, out: Connection) -> None:
    _pin(server_cpus())
    out.send(uvloop.run(_write(connections, tick, seconds)))


class _Accepted(asyncio.Protocol):
    def __init__(self, into: list[asyncio.Transport]) -> None:
        self._into = into

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._into.append(cast(asyncio.Transport, transport))  # uvloop's: not a subclass


async def _write(connections: int, tick: float, seconds: float) -> Floor:
    loop = asyncio.get_running_loop()
    transports: list[asyncio.Transport] = []
    server = await loop.create_server(lambda: _Accepted(transports), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader = multiprocessing.Process(target=_drain, args=(port, connections, seconds + 30))
    reader.start()
    try:
        deadline = loop.time() + PROCESS_TIMEOUT / 2
        while len(transports) < connections:
            if loop.time() > deadline:
                raise TimeoutError(f"{len(transports)} of {connections} connections opened")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        written, cpu, wall = 0, time.process_time(), time.perf_counter()
        due = loop.time()
        while time.perf_counter() - wall < seconds:
            for transport in transports:
                transport.write(FRAME)
            written += len(transports)
            due += tick
            await asyncio.sleep(max(0.0, due - loop.time()))
        cpu = time.process_time() - cpu
        wall = time.perf_counter() - wall
    finally:
        reader.kill()
        reader.join()
        server.close()
    return Floor(
        f"writes, {connections} connections every {tick * 1000:.0f} ms",
        written / wall,
        cpu / wall,
        cpu / max(written, 1) * 1e6,
    )


def _drain(port: int, connections: int, lifetime: float) -> None:
    """Open `connections` to `port` and read whatever arrives, for `lifetime` seconds."""
    _pin(client_cpus())

    class Drain(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(connections):
            await loop.create_connection(Drain, "127.0.0.1", port)
        await asyncio.sleep(lifetime)

    uvloop.run(main())


def report(floor: Floor) -> str:
    return (
        f"{floor.what}: {floor.per_second:,.0f}/s, {floor.core_share:.0%} of a core, "
        f"{floor.us_each:.2f} µs each"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floors", description=__doc__)
    parser.add_argument("--streams", type=int, default=2400, help="paced streams and connections")
    parser.add_argument("--tick", type=float, default=0.04, help="seconds between writes")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per floor")
    args = parser.parse_args()
    print(pinning_note())
    print(report(pacing(args.streams, args.seconds)))
    print(report(writes(args.streams, args.tick, args.seconds)))


if __name__ == "__main__":
    main()
