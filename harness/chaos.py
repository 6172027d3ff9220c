"""Chaos for the resume bench and the soak: clients that keep many streams going through
random connection cuts, following PROTOCOL.md's client rules, and an audit of every frame.

A `ResumingClient` is one identity (cookie) with one WebSocket connection at a time and any
number of streams. On every drop it reconnects with backoff (rotating over its `urls`, so
with one URL per node each reconnect lands on the other node) and sends `resume` with
`after` = the last seq shown for every unfinished stream, or the `chat` again (same id) for
one not yet acknowledged. The client rules themselves are the browser's: the pure
`tokenwire.core.session.Session` decides what is shown, so the soak also proves the client
code the page runs.

Beside those rules, every frame is audited against what the server promised, per
connection and stream (`Tally`):

- lost: a token frame that starts beyond the last seq received on this connection (the
  server skipped tokens; the session then resumes, so the text still comes out whole), and
  tokens missing from a stream's final text;
- duplicated: tokens at or below the last seq received on this connection. One exception is
  the protocol's own: after `resume` (or `chat`) with `after = A`, the answer starts again at
  `A + 1`, which may repeat live tokens that reached this connection before the server read
  the resume. Each request allows one such restart;
- wrong: tokens whose text is not the provider's for their seq (`demo_tokens`), and final
  texts that differ from `demo_reply`;
- stale (counted apart, not a failure): tokens at or below `A` that reach a new connection
  before anything beyond `A` did. They are live events of the stream that the server had
  not delivered when the connection opened (late from Redis) and forwards before it reads
  the client's `resume`; PROTOCOL.md lets this race happen and the client rule drops them.

The driver `run_streams` runs many clients in one event loop, each keeping several chats
going back to back. The cuts come from `e2e.proxy.TcpProxy.start_chaos` between the clients
and the server. Everything is bounded: connection attempts, waits for ends, closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Final

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from backend.providers import DEFAULT_PARAGRAPHS, demo_tokens
from harness.server import Client, Server, start_chat

# The browser's client cores import each other as `tokenwire.core...`, with `frontend/` as
# the import root (as in tests/unit/frontend/conftest.py).
FRONTEND: Final = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "frontend"
)
if FRONTEND not in sys.path:
    sys.path.insert(0, FRONTEND)

from tokenwire.core import protocol as wire  # noqa: E402
from tokenwire.core.backoff import Backoff  # noqa: E402
from tokenwire.core.session import Session  # noqa: E402

# Reconnect delays under chaos: short, since every connection is cut within seconds; still
# growing with failed attempts and jittered, as the browser's schedule is.
CHAOS_BACKOFF: Final = (0.005, 0.02, 0.1, 0.3, 1.0)
STABLE_AFTER: Final = 0.5  # seconds a connection must stay up to start the schedule over
OPEN_TIMEOUT: Final = 5.0  # TCP + upgrade + hello
CLOSE_TIMEOUT: Final = 2.0
RECENT_ENDED: Final = 256  # ended streams kept per client to audit late frames of theirs
MAX_SAMPLES: Final = 5  # undecodable frames and failed streams kept for the report
TRACE_EVENTS: Final = 48
PROMPTS: Final = tuple(f"chaos prompt {i}: tell me about resuming" for i in range(16))


@lru_cache(maxsize=256)
def provider_tokens(prompt: str, paragraphs: int) -> tuple[str, ...]:
    return tuple(demo_tokens(prompt, paragraphs))


@dataclass
class Tally:
    """What all clients of a run saw. The server is right when `problems()` is empty."""

    chats: int = 0  # streams started
    completed: int = 0  # ended with done "stop" and exactly the provider's text
    failed: int = 0  # ended otherwise (error frame, wrong text)
    unfinished: int = 0  # never ended within the patience given
    tokens: int = 0  # tokens shown (each exactly once)
    frames: int = 0  # token frames received
    lost: int = 0
    duplicated: int = 0
    stale: int = 0  # see the module docstring: allowed by the protocol, reported apart
    wrong: int = 0
    stray: int = 0  # frames of streams this client never asked for on that connection
    bad_frames: int = 0  # frames the client could not decode
    connects: int = 0  # connections opened (hello received)
    failed_connects: int = 0
    drops: int = 0  # connections that ended while the client still wanted them
    resumes: int = 0  # streams asked for again after a reconnect (resume or repeated chat)
    rerequests: int = 0  # resumes sent by the client rules on a gap or overlap
    cross_node: int = 0  # reconnects that landed on another node than the connection before
    failures: Counter[str] = field(default_factory=Counter)  # why streams failed
    connection_errors: Counter[str] = field(default_factory=Counter)
    nodes: Counter[str] = field(default_factory=Counter)  # connections opened, per node
    replay_latency: list[float] = field(default_factory=list)  # seconds, see ResumingClient
    undecodable: list[str] = field(default_factory=list)  # the first few, for the report
    # The last events of the first few failed streams, for the report.
    failed_traces: list[list[tuple[Any, ...]]] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Every broken promise, worded for an assertion message; empty when all is right."""
        checks = {
            "lost tokens": self.lost,
            "duplicated tokens": self.duplicated,
            "wrong tokens": self.wrong,
            "failed streams": self.failed,
            "unfinished streams": self.unfinished,
            "stray frames": self.stray,
            "undecodable frames": self.bad_frames,
            "connection errors": sum(self.connection_errors.values()),
        }
        found = [f"{name}: {count}" for name, count in checks.items() if count]
        if self.failures:
            found.append(f"failures by reason: {dict(self.failures)}")
        if self.undecodable:
            found.append(f"undecodable frames, the first ones: {self.undecodable}")
        for trace in self.failed_traces:
            found.append(f"a failed or broken stream's last events: {trace}")
        if self.connection_errors:
            found.append(f"connection errors by code: {dict(self.connection_errors)}")
        return found

    def add(self, other: Tally) -> None:
        """Count `other`'s run into this one (the samples kept stay bounded)."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, int):
                setattr(self, f.name, mine + theirs)
            elif isinstance(mine, Counter):
                mine.update(theirs)
            elif f.name == "replay_latency":
                mine.extend(theirs)
            else:
                mine.extend(theirs[: max(0, MAX_SAMPLES - len(mine))])

    def percentile(self, q: float) -> float:
        """Replay latency at quantile `q` (0..1), seconds; NaN without samples."""
        data = sorted(self.replay_latency)
        if not data:
            return float("nan")
        if len(data) == 1:
            return data[0]
        return statistics.quantiles(data, n=1000, method="inclusive")[
            min(998, max(0, round(q * 1000) - 1))
        ]


@dataclass(eq=False)
class ChaosStream:
    """One chat as this client keeps it: the provider's tokens, what was shown, and the
    audit state of the current connection."""

    id: str
    conversation: str
    prompt: str
    tokens: tuple[str, ...]
    parts: list[str] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end: dict[str, Any] | None = None
    sent: bool = False  # its chat went out on some connection
    wire_last: int | None = None  # last seq received on the current connection
    restarts: list[int] = field(default_factory=list)  # allowed restart points, see module
    replay_from: float | None = None  # when the reconnect awaiting its first frame began
    asked_after: int = 0  # `after` of the request on the current connection
    beyond: bool = False  # a token above `asked_after` came on the current connection
    # Its last events (connection, frame summary), reported if it fails.
    trace: deque[tuple[Any, ...]] = field(default_factory=lambda: deque(maxlen=TRACE_EVENTS))

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def expected(self, first: int, last: int) -> str:
        return "".join(self.tokens[first - 1 : last])


class ResumingClient:
    """One identity, many streams, one connection at a time; see the module docstring.

    `replay latency` (in the tally): from the start of the connection attempt that
    succeeded after a drop to the first token or end frame of each stream resumed on it.
    It includes the provider's wait when nothing new was produced during the outage.
    """

    def __init__(
        self,
        urls: Sequence[str],
        tally: Tally,
        paragraphs: int = DEFAULT_PARAGRAPHS,
        rng: random.Random | None = None,
    ) -> None:
        if not urls:
            raise ValueError("a client needs at least one URL")
        self.urls = list(urls)
        self.tally = tally
        self.paragraphs = paragraphs
        self.rng = rng or random.Random()
        self.session = Session()
        self.streams: dict[str, ChaosStream] = {}  # unfinished
        self.cookie: str | None = None
        self.node: str | None = None  # the node of the current (or last) connection
        self._ended: dict[str, ChaosStream] = {}  # the last RECENT_ENDED, oldest first
        self._ws: ClientConnection | None = None
        self._closing = False
        self._attempts = 0
        self._opened = 0
        self._backoff = Backoff(self.rng.random, schedule=CHAOS_BACKOFF, stable_after=STABLE_AFTER)
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self, first_url: int = 0) -> None:
        self._attempts = first_url
        self._task = asyncio.create_task(self._run(), name="chaos client")

    async def close(self) -> None:
        """Leave: close the connection (bounded) and end the connection loop."""
        self._closing = True
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await ws.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # ---- what the driver calls -----------------------------------------------------------

    async def chat(self, prompt: str) -> ChaosStream:
        """Start a new chat; it is sent now if connected, else on the next connection."""
        stream = ChaosStream(
            id=uuid.uuid4().hex,
            conversation=uuid.uuid4().hex,
            prompt=prompt,
            tokens=provider_tokens(prompt, self.paragraphs),
        )
        self.streams[stream.id] = stream
        self.session.track(stream.id, stream.conversation, acked=False)
        self.tally.chats += 1
        ws = self._ws
        if ws is not None:
            # Checked and marked before any await: the (re)open never sends it a second time.
            await self._send(ws, [self._request(stream, after=0, began=None)])
        return stream

    def missing(self, stream: ChaosStream) -> int:
        """Tokens of `stream` not shown (yet)."""
        shown = self.session.get(stream.id)
        return len(stream.tokens) - (shown.last if shown is not None else len(stream.tokens))

    # ---- the connection loop -------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closing:
            url = self.urls[self._attempts % len(self.urls)]
            self._attempts += 1
            began = time.monotonic()
            ws = await self._open(url)
            if ws is None:
                self.tally.failed_connects += 1
                await asyncio.sleep(self._backoff.next_delay())
                continue
            self._backoff.opened(time.monotonic())
            try:
                await self._serve(ws, began)
            finally:
                self._ws = None
            if self._closing:
                return
            self.tally.drops += 1
            self._backoff.closed(time.monotonic())
            await asyncio.sleep(self._backoff.next_delay())

    async def _open(self, url: str) -> ClientConnection | None:
        headers = {"Cookie": self.cookie} if self.cookie else {}
        ws: ClientConnection | None = None
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                ws = await connect(
                    url,
                    additional_headers=headers,
                    compression=None,  # the cheapest client; deflate is not what is tested
                    ping_interval=None,  # the server's application heartbeat is enough
                    open_timeout=None,
                    close_timeout=CLOSE_TIMEOUT,
                )
                message = await ws.recv()
                hello = wire.decode(message) if isinstance(message, str) else None
        except (OSError, TimeoutError, EOFError, InvalidHandshake, ConnectionClosed):
            if ws is not None:
                await _abandon(ws)
            return None
        if hello is None or hello["type"] != "hello":
            self._undecodable(message)
            await _abandon(ws)
            return None
        if self.cookie is None:
            set_cookie = ws.response.headers.get("set-cookie") if ws.response else None
            if set_cookie:
                self.cookie = set_cookie.split(";", 1)[0]
        node = hello.get("node")
        if self.node is not None and node != self.node:
            self.tally.cross_node += 1
        self.tally.nodes[str(node)] += 1
        self.node = node
        self.tally.connects += 1
        self._opened += 1
        return ws

    async def _serve(self, ws: ClientConnection, began: float) -> None:
        # Set and snapshot with no await in between: a `chat` racing this open is either
        # in the snapshot or sees the connection, never both.
        self._ws = ws
        for ended in self._ended.values():
            ended.wire_last = None  # not asked for on this connection: its frames are stray
        requests = [
            self._request(stream, self.session.get(stream.id).last, began)
            for stream in self.streams.values()
        ]
        if not await self._send(ws, requests):
            return
        try:
            async for message in ws:
                replies = self._receive(message)
                if replies and not await self._send(ws, replies):
                    return
        except ConnectionClosed:
            return

    def _request(self, stream: ChaosStream, after: int, began: float | None) -> dict[str, Any]:
        """The frame that (re)asks for `stream` on the current connection: `chat` until it
        is acknowledged, then `resume`. Resets the stream's audit for this connection."""
        shown = self.session.get(stream.id)
        if stream.sent:
            self.tally.resumes += 1
            stream.replay_from = began
        stream.sent = True
        stream.trace.append(("ask", self._opened, self.node, after, shown.acked))
        stream.wire_last = after
        stream.restarts = [after + 1]
        stream.asked_after, stream.beyond = after, False
        if not shown.acked:
            return wire.chat(stream.id, stream.conversation, stream.prompt, after=after)
        shown.resume_pending = True  # the session's own rule, as its resume_frames does
        return wire.resume(stream.id, after)

    async def _send(self, ws: ClientConnection, frames: list[dict[str, Any]]) -> bool:
        """False if the connection is gone (the loop then reconnects and asks again)."""
        try:
            for frame in frames:
                await ws.send(wire.encode(frame))
        except ConnectionClosed:
            return False
        return True

    # ---- frames in -------------------------------------------------------------------

    def _receive(self, message: str | bytes) -> list[dict[str, Any]]:
        """Apply one server frame; the frames to send back."""
        frame = wire.decode(message) if isinstance(message, str) else None
        if frame is None:
            self._undecodable(message)
            return []
        kind = frame["type"]
        if kind == "token":
            return self._on_token(frame)
        if kind == "done":
            return self._on_done(frame)
        if kind == "ack":
            self.session.acked(frame["id"])
            if (acked := self.streams.get(frame["id"])) is not None:
                acked.trace.append(("ack", self._opened))
        elif kind == "error":
            self._on_error(frame)
        elif kind == "ping":
            return [wire.pong(frame["t"])]
        return []

    def _undecodable(self, message: str | bytes) -> None:
        self.tally.bad_frames += 1
        if len(self.tally.undecodable) < MAX_SAMPLES:
            self.tally.undecodable.append(repr(message[:300]))

    def _stream(self, id: str) -> ChaosStream | None:
        stream = self.streams.get(id) or self._ended.get(id)
        if stream is None or stream.wire_last is None:
            self.tally.stray += 1
            return None
        return stream

    def _on_token(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        stream = self._stream(frame["id"])
        if stream is None:
            return []
        seq, n = frame["seq"], frame["n"]
        first = seq - n + 1
        self.tally.frames += 1
        self._audit(stream, first, seq)
        right = frame["data"] == stream.expected(first, seq)
        if not right:
            self.tally.wrong += n
        stream.trace.append(("token", self._opened, first, seq, right))
        self._replayed(stream)
        text, reply = self.session.on_token(frame)
        if text is not None:
            stream.parts.append(text)
            self.tally.tokens += n
        return self._rerequest(stream, reply)

    def _on_done(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        stream = self._stream(frame["id"])
        if stream is None:
            return []
        self._replayed(stream)
        stream.trace.append(("done", self._opened, frame["seq"], frame["reason"]))
        status, reply = self.session.on_done(frame)
        if status is not None:
            self._finish(stream, frame)
        return self._rerequest(stream, reply)

    def _on_error(self, frame: dict[str, Any]) -> None:
        id = frame.get("id")
        if id is None:
            self.tally.connection_errors[frame["code"]] += 1
            return
        stream = self._stream(id)
        if stream is not None:
            stream.trace.append(("error", self._opened, frame["code"], frame["message"][:80]))
        if stream is not None and self.session.on_error(frame) is not None:
            self._finish(stream, frame)

    def _audit(self, stream: ChaosStream, first: int, seq: int) -> None:
        last = stream.wire_last
        assert last is not None  # _stream checked it
        beyond = stream.beyond
        stream.beyond = beyond or seq > stream.asked_after
        if not beyond and seq <= stream.asked_after and first <= last:
            self.tally.stale += seq - first + 1
            return
        if first == last + 1:
            stream.wire_last = seq
        elif first in stream.restarts:
            stream.restarts.remove(first)
            stream.wire_last = seq
        elif first <= last:
            self.tally.duplicated += min(seq, last) - first + 1
            stream.wire_last = max(last, seq)
            self._anomaly(stream, "duplicated", first, seq)
        else:
            self.tally.lost += first - last - 1
            stream.wire_last = seq
            self._anomaly(stream, "lost", first, seq)

    def _anomaly(self, stream: ChaosStream, what: str, first: int, seq: int) -> None:
        if len(self.tally.failed_traces) < MAX_SAMPLES:
            trace = [*stream.trace, (what, self._opened, first, seq, stream.restarts[:])]
            self.tally.failed_traces.append(trace)

    def _replayed(self, stream: ChaosStream) -> None:
        if stream.replay_from is not None:
            self.tally.replay_latency.append(time.monotonic() - stream.replay_from)
            stream.replay_from = None

    def _rerequest(self, stream: ChaosStream, reply: dict[str, Any] | None) -> list[dict[str, Any]]:
        if reply is None:
            return []
        self.tally.rerequests += 1
        stream.restarts.append(reply["after"] + 1)
        return [reply]

    def _finish(self, stream: ChaosStream, end: dict[str, Any]) -> None:
        stream.end = end
        text, expected = stream.text, "".join(stream.tokens)
        clean = (
            end["type"] == "done"
            and end["reason"] == "stop"
            and end["seq"] == len(stream.tokens)
            and text == expected
        )
        if clean:
            self.tally.completed += 1
        else:
            self.tally.failed += 1
            self.tally.failures[end.get("reason") or end.get("code") or "?"] += 1
            shown = self.session.get(stream.id).last
            self.tally.lost += max(0, len(stream.tokens) - shown)
            if not expected.startswith(text):
                self.tally.wrong += 1
            if len(self.tally.failed_traces) < MAX_SAMPLES:
                self.tally.failed_traces.append(list(stream.trace))
        self.session.forget(stream.id)
        del self.streams[stream.id]
        self._ended[stream.id] = stream
        while len(self._ended) > RECENT_ENDED:
            del self._ended[next(iter(self._ended))]
        stream.ended.set()


async def _abandon(ws: ClientConnection) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await ws.close()


# ---- the driver ------------------------------------------------------------------------


async def keep_chatting(
    client: ResumingClient,
    rng: random.Random,
    more: Callable[[], bool],
    patience: float,
) -> None:
    """One slot: start a chat, wait for its end, again, while `more()`; a chat that does
    not end within `patience` seconds is counted unfinished and the slot stops."""
    while more():
        stream = await client.chat(rng.choice(PROMPTS))
        try:
            async with asyncio.timeout(patience):
                await stream.ended.wait()
        except TimeoutError:
            client.tally.unfinished += 1
            client.tally.lost += client.missing(stream)
            return


async def run_streams(
    urls: Sequence[str],
    tally: Tally,
    *,
    clients: int,
    streams_per_client: int,
    more: Callable[[], bool],
    paragraphs: int = DEFAULT_PARAGRAPHS,
    seed: int = 0,
    patience: float = 60.0,
    while_running: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """`clients` clients (one identity each, spread over `urls`), each keeping
    `streams_per_client` chats going back to back while `more()`; returns once every chat
    ended (or ran out of `patience`) and every client left. `while_running` is awaited
    once all clients have started, beside the chats (e.g. to sample the server)."""
    rng = random.Random(seed)
    everyone = [
        ResumingClient(urls, tally, paragraphs, random.Random(rng.random())) for _ in range(clients)
    ]
    for index, client in enumerate(everyone):
        client.start(first_url=index % len(urls))
    try:
        slots = [
            keep_chatting(client, random.Random(rng.random()), more, patience)
            for client in everyone
            for _ in range(streams_per_client)
        ]
        extra = [while_running()] if while_running is not None else []
        await asyncio.gather(*slots, *extra)
    finally:
        await asyncio.gather(*(client.close() for client in everyone))


# ---- the server's side -------------------------------------------------------------------


async def warm_up(server: Server) -> None:
    """One chat to its end on `server`, outside any chaos: a server starts some of its
    one-per-process tasks (sweeps, Redis pipelines) on first use, so its baseline is taken
    after one client came and went."""
    client = await Client.connect(server)
    try:
        stream, _ = await start_chat(client, "warm up")
        await client.until_end(stream)
    finally:
        await client.close()


# Gauges that must come back to their values before a run once all clients left.
BASELINE_GAUGES: Final = (
    "tokenwire_connections",
    "tokenwire_subscriptions",
    "tokenwire_streams_active",
    "tokenwire_tasks",  # asyncio tasks, where the server reports them
)


def gauges(metrics: dict[str, float]) -> dict[str, float]:
    return {name: metrics[name] for name in BASELINE_GAUGES if name in metrics}
