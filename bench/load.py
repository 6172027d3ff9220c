"""Load-generating clients: worker processes, each driving many WebSocket connections with
one stream each, for every peer (tokenwire, bare websockets, Socket.IO).

Cheap on purpose, because the client shares the machine's two cores with the server under
test: each connection is a plain `asyncio.Protocol` speaking RFC 6455 itself (the
server's frames are unmasked, so reading one is a header, a slice and a msgspec decode; no
task switch per frame), and Socket.IO is spoken as Engine.IO v4 / Socket.IO v5 packets
over that socket (`0` open, `40` connect, `2`/`3` ping/pong, `42[event, data]`). Workers
pin themselves to the CPUs they are given (`Plan.cpus`), away from the server's.

Every stream is checked at its end: tokens are counted by each frame's `n` (tokenwire
joins tokens: `data` holds `n` tokens and `seq` is the last), and the text received must
equal the provider's exactly (demo) or hold exactly the expected number of tokens, each
once and in order (clock). Each token's lateness is measured too: for the clock provider
the receive time minus the production time written in the token; for the demo provider
the receive time minus the token's due time, counted like the provider does from the
moment the chat was sent (first token delay, then one token every 1/rate seconds).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import math
import multiprocessing
import os
import time
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final

import msgspec

from backend.providers.demo import demo_tokens

PROMPT: Final = "How do I stream tokens to many browsers?"
CONNECT_TIMEOUT: Final = 30.0
CONNECT_CONCURRENCY: Final = 200  # handshakes in flight per worker (below listen backlogs)
READY_TIMEOUT: Final = 120.0
_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SOCKETIO_PATH: Final = "/socket.io/?EIO=4&transport=websocket"
KINDS: Final = ("tokenwire", "bare", "socketio")


@dataclass(frozen=True)
class Plan:
    """What one load run does. `port` gets the chats; with `read_port` (the Redis hop), a
    second connection of the same user on that port is the one measured."""

    kind: str  # one of KINDS
    port: int
    streams: int
    rate: float  # tokens/s of each stream (the server's setting; used for due times)
    paragraphs: int
    clock: bool = False  # tokens are production times (TOKENWIRE_PROVIDER=clock)
    read_port: int | None = None
    first_token_delay: float = 0.0
    stagger: float = 1.0  # chats start spread evenly over this many seconds
    window: tuple[float, float] = (0.0, math.inf)  # seconds after start: tokens counted
    timeout: float = 60.0  # streams not done this long after start are abandoned
    prompt: str = PROMPT
    cpus: tuple[int, ...] = ()  # pin the workers here (nothing: no pinning)
    host: str = "127.0.0.1"

    def expected(self) -> list[str]:
        return demo_tokens(self.prompt, self.paragraphs)


@dataclass
class Tally:
    """What the clients saw; tallies of several workers add up (`merge`)."""

    streams: int = 0
    exact: int = 0  # ended, with exactly the provider's tokens, once and in order
    wrong: int = 0  # ended with missing, repeated or different text, or with an error
    unfinished: int = 0  # not ended by the timeout
    lost: int = 0  # tokens missing at the end of a stream
    duplicated: int = 0  # tokens received again (seq not above the last)
    tokens: int = 0
    frames: int = 0
    window_tokens: int = 0
    window_frames: int = 0
    lateness_ms: array[float] = field(default_factory=lambda: array("d"))
    connect_seconds: float = 0.0  # the slowest worker's time to open its connections
    client_cpu_seconds: float = 0.0  # of the worker processes, over the whole run

    def merge(self, other: Tally) -> None:
        for name in (
            "streams",
            "exact",
            "wrong",
            "unfinished",
            "lost",
            "duplicated",
            "tokens",
            "frames",
            "window_tokens",
            "window_frames",
            "client_cpu_seconds",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lateness_ms.extend(other.lateness_ms)
        self.connect_seconds = max(self.connect_seconds, other.connect_seconds)

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100) of the lateness, in ms (nan if nothing was seen)."""
        if not self.lateness_ms:
            return math.nan
        ordered = sorted(self.lateness_ms)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


class Frame(msgspec.Struct):
    """The fields of a server frame the client reads (tokenwire's, the peers' alike)."""

    type: str = ""
    id: str | None = None
    seq: int = 0
    data: str = ""
    n: int = 1
    t: Any = None


OnMessage = Callable[["Wire", bytes, float], None]
_decode_frame = msgspec.json.Decoder(Frame).decode
_decode_event = msgspec.json.Decoder(tuple[str, Frame]).decode
_encode = msgspec.json.encode


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One client-to-server frame (RFC 6455: clients must mask)."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    keys = (key * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")
    return header + key + body


class Wire(asyncio.Protocol):
    """One client WebSocket: the opening handshake, then whole text messages handed to
    `on_message(wire, payload, now)` with `now` the wall-clock time the bytes arrived (from
    the first read on: the server may speak first, in the handshake's packet). Answers
    protocol pings; closes on a close frame."""

    def __init__(
        self, host: str, port: int, path: str, cookie: str | None, on_message: OnMessage
    ) -> None:
        self.key = base64.b64encode(os.urandom(16))
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {self.key.decode()}\r\n"
            + (f"Cookie: {cookie}\r\n" if cookie else "")
            + "\r\n"
        ).encode()
        self.buffer = bytearray()
        self.open: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.upgraded = False
        self.fragments: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.on_message = on_message

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.open.done():
            self.open.set_exception(ConnectionError(f"closed during the handshake: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send_text(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(masked_frame(payload))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self.buffer
        buffer += data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self._handshake(bytes(buffer[:end]))
            del buffer[: end + 4]
        # Walk the frames with an offset and trim once: deleting per frame would copy the
        # rest of a 64 KB read hundreds of times.
        at, size = 0, len(buffer)
        while size - at >= 2:
            b0, length = buffer[at], buffer[at + 1] & 0x7F
            start = at + 2
            if length == 126:
                if size - at < 4:
                    break
                length, start = int.from_bytes(buffer[at + 2 : at + 4], "big"), at + 4
            elif length == 127:
                if size - at < 10:
                    break
                length, start = int.from_bytes(buffer[at + 2 : at + 10], "big"), at + 10
            if size - start < length:
                break
            payload = bytes(buffer[start : start + length])
            at = start + length
            opcode = b0 & 0x0F
            if opcode in (0x1, 0x2, 0x0):
                if not b0 & 0x80:
                    self.fragments.append(payload)
                    continue
                if self.fragments:
                    payload = b"".join([*self.fragments, payload])
                    self.fragments.clear()
                self.on_message(self, payload, now)
            elif opcode == 0x9 and self.transport is not None:
                self.transport.write(masked_frame(payload, 0xA))
            elif opcode == 0x8:
                self.close()
                break
        del buffer[:at]

    def _handshake(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            self.open.set_exception(ConnectionError(f"upgrade refused: {lines[0]}"))
            self.close()
            return
        headers = {}
        cookie = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
            if name.strip().lower() == "set-cookie":
                cookie = value.strip().split(";", 1)[0]
        accept = base64.b64encode(hashlib.sha1(self.key + _WS_GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            self.open.set_exception(ConnectionError("bad Sec-WebSocket-Accept"))
            self.close()
            return
        self.upgraded = True
        self.open.set_result(cookie)


async def open_wire(
    host: str, port: int, path: str, on_message: OnMessage, cookie: str | None = None
) -> Wire:
    loop = asyncio.get_running_loop()
    _, wire = await loop.create_connection(
        lambda: Wire(host, port, path, cookie, on_message), host, port
    )
    await asyncio.wait_for(asyncio.shield(wire.open), CONNECT_TIMEOUT)
    return wire


class StreamClient:
    """One stream over one connection (plus, for the Redis hop, the sending connection)."""

    def __init__(self, worker: Worker, number: int) -> None:
        self.w = worker
        self.plan = worker.plan
        self.id = f"{uuid.uuid4().hex[:20]}{number}"
        self.wire: Wire | None = None
        self.sender: Wire | None = None
        self.sent_at = 0.0
        self.last = 0
        self.parts: list[str] = []
        self.ended = asyncio.get_running_loop().create_future()
        self.failed = False
        self.sio_ready = asyncio.get_running_loop().create_future()

    async def connect(self) -> None:
        plan = self.plan
        if plan.kind == "socketio":
            self.wire = await open_wire(plan.host, plan.port, SOCKETIO_PATH, self._on_socketio)
            await asyncio.wait_for(asyncio.shield(self.sio_ready), CONNECT_TIMEOUT)
            return
        path = "/ws" if plan.kind == "tokenwire" else "/"
        if plan.read_port is None:
            self.wire = await open_wire(plan.host, plan.port, path, self._on_message)
            return
        # The same user (its cookie) on the other node reads; this one only sends.
        self.sender = await open_wire(plan.host, plan.port, path, self._on_sender)
        cookie = await self.sender.open
        self.wire = await open_wire(plan.host, plan.read_port, path, self._on_message, cookie)

    def send_chat(self) -> None:
        self.sent_at = time.time()
        if self.plan.kind == "socketio":
            payload = b"42" + _encode(["chat", {"id": self.id, "text": self.plan.prompt}])
        else:
            frame = {
                "type": "chat",
                "id": self.id,
                "conversation": self.id,
                "text": self.plan.prompt,
            }
            payload = _encode(frame)
        target = self.sender or self.wire
        assert target is not None
        target.send_text(payload)

    # ---- receiving ---------------------------------------------------------------------

    def _on_sender(self, wire: Wire, payload: bytes, now: float) -> None:
        if b'"type":"ping"' in payload:
            wire.send_text(_encode({"type": "pong", "t": _decode_frame(payload).t}))

    def _on_message(self, wire: Wire, payload: bytes, now: float) -> None:
        self._on_frame(wire, _decode_frame(payload), now)

    def _on_socketio(self, wire: Wire, payload: bytes, now: float) -> None:
        if payload.startswith(b"42"):
            event, frame = _decode_event(payload[2:])
            frame.type = event
            self._on_frame(wire, frame, now)
        elif payload == b"2":
            wire.send_text(b"3")
        elif payload.startswith(b"0"):
            wire.send_text(b"40")
        elif payload.startswith(b"40") and not self.sio_ready.done():
            self.sio_ready.set_result(None)
        elif payload.startswith(b"44") and not self.sio_ready.done():
            self.sio_ready.set_exception(ConnectionError(f"refused: {payload[:200]!r}"))

    def _on_frame(self, wire: Wire, frame: Frame, now: float) -> None:
        kind = frame.type
        if kind == "token":
            if frame.id != self.id:
                return
            self._on_token(frame, now)
        elif kind in ("done", "error"):
            if frame.id == self.id:
                self.failed = self.failed or kind == "error"
                if not self.ended.done():
                    self.ended.set_result(None)
        elif kind == "ping":
            wire.send_text(_encode({"type": "pong", "t": frame.t}))

    def _on_token(self, frame: Frame, now: float) -> None:
        w = self.w
        n, seq = frame.n, frame.seq
        first = seq - n + 1
        w.tally.frames += 1
        if seq <= self.last:
            w.tally.duplicated += n
            return
        if first != self.last + 1:
            self.failed = True  # a gap: this client does not resume, so tokens are lost
        self.last = seq
        self.parts.append(frame.data)
        w.tally.tokens += n
        if not w.window_start <= now < w.window_end:
            return
        w.tally.window_tokens += n
        w.tally.window_frames += 1
        late = w.tally.lateness_ms
        if self.plan.clock:
            now_us = now * 1e6
            for produced in frame.data.split():
                late.append((now_us - int(produced)) / 1000)
        else:
            base = self.sent_at + self.plan.first_token_delay
            interval = 1.0 / self.plan.rate
            for k in range(first - 1, seq):
                late.append((now - base - k * interval) * 1000)

    def verdict(self, expected: list[str], text: str) -> None:
        tally = self.w.tally
        tally.streams += 1
        if not self.ended.done():
            tally.unfinished += 1
            return
        count = len(expected)
        tally.lost += max(0, count - self.last)
        if self.plan.clock:
            exact = self.last == count and len(" ".join(self.parts).split()) == count
        else:
            exact = self.last == count and "".join(self.parts) == text
        if exact and not self.failed:
            tally.exact += 1
        else:
            tally.wrong += 1

    def close(self) -> None:
        for wire in (self.wire, self.sender):
            if wire is not None:
                wire.close()


class Worker:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.tally = Tally()
        self.window_start = 0.0
        self.window_end = 0.0

    async def run(self, control: Connection) -> Tally:
        plan = self.plan
        expected = plan.expected()
        text = "".join(expected)
        began = time.monotonic()
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        clients = [StreamClient(self, i) for i in range(plan.streams)]

        async def connect(client: StreamClient) -> None:
            async with gate:
                await client.connect()

        try:
            outcomes = await asyncio.gather(*(connect(c) for c in clients), return_exceptions=True)
            failures = [o for o in outcomes if isinstance(o, BaseException)]
            if failures:
                first = failures[0]
                raise ConnectionError(
                    f"{len(failures)} of {plan.streams} connections to {plan.kind} on port "
                    f"{plan.port} failed; the first: {type(first).__name__}: {first}"
                )
            self.tally.connect_seconds = time.monotonic() - began
            control.send(("ready", self.tally.connect_seconds))
            start_at: float = await asyncio.to_thread(control.recv)
            self.window_start = start_at + plan.window[0]
            self.window_end = start_at + plan.window[1]
            step = plan.stagger / max(1, plan.streams)
            loop = asyncio.get_running_loop()
            for i, client in enumerate(clients):
                delay = start_at + i * step - time.time()
                loop.call_later(max(0.0, delay), client.send_chat)
            remaining = start_at + plan.timeout - time.time()
            await asyncio.wait([c.ended for c in clients], timeout=max(0.0, remaining))
            for client in clients:
                client.verdict(expected, text)
        finally:
            for client in clients:
                client.close()
        return self.tally


def _worker_main(plan: Plan, control: Connection) -> None:
    if plan.cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(plan.cpus))
    worker = Worker(plan)
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    try:
        tally = run(worker.run(control))
    except BaseException as exc:  # reported to the parent, which raises it
        control.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    times = os.times()
    tally.client_cpu_seconds = times.user + times.system
    control.send(("result", tally))


class Load:
    """`plan.streams` streams split over `workers` processes (spawned: no state shared with
    the parent). Use as a context manager: entering opens every connection; `start(at)`
    begins the chats at wall-clock time `at`; `results()` waits for the merged tally."""

    def __init__(self, plan: Plan, workers: int = 1) -> None:
        workers = max(1, min(workers, plan.streams))
        shares = [plan.streams // workers + (i < plan.streams % workers) for i in range(workers)]
        self.plans = [dataclasses.replace(plan, streams=share) for share in shares if share]
        self.plan = plan
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.controls: list[Connection] = []
        self.connect_seconds = 0.0

    def __enter__(self) -> Load:
        ctx = multiprocessing.get_context("spawn")
        try:
            for plan in self.plans:
                parent, child = ctx.Pipe()
                process = ctx.Process(target=_worker_main, args=(plan, child), daemon=True)
                process.start()
                self.processes.append(process)
                self.controls.append(parent)
            for control in self.controls:
                kind, value = self._receive(control, READY_TIMEOUT)
                if kind != "ready":
                    raise RuntimeError(f"a load worker failed while connecting: {value}")
                self.connect_seconds = max(self.connect_seconds, value)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def start(self, at: float) -> None:
        for control in self.controls:
            control.send(at)

    def results(self) -> Tally:
        total = Tally()
        for control in self.controls:
            kind, value = self._receive(control, self.plan.timeout + READY_TIMEOUT)
            if kind != "result":
                raise RuntimeError(f"a load worker failed: {value}")
            total.merge(value)
        return total

    @staticmethod
    def _receive(control: Connection, timeout: float) -> tuple[str, Any]:
        if not control.poll(timeout):
            raise TimeoutError(f"no word from a load worker in {timeout:.0f}s")
        try:
            message: tuple[str, Any] = control.recv()
        except EOFError:
            raise RuntimeError("a load worker died (see its traceback above)") from None
        return message

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        for control in self.controls:
            control.close()


def run_load(plan: Plan, workers: int = 1, lead: float = 0.3) -> Tally:
    """Open, start `lead` seconds later, wait for the end: the merged tally."""
    with Load(plan, workers) as load:
        load.start(time.time() + lead)
        return load.results()
