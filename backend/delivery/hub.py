"""The live clients of this process (WebSocket connections and SSE responses): for
admission and metrics, for the two process-wide sweeps that serve every idle client, and for
shutdown, which tells each of them to go away and waits, bounded, until they have.

Deliberate choices a reader might want to "fix":

- One heartbeat sweep and one watch sweep for the whole process, not a task (and a timer)
  per connection: an idle connection then costs no task, no coroutine frame and no timer of
  its own, which is most of what tokenwire adds to the framework's memory per connection
  (bench/idle.py). The heartbeat keeps PROTOCOL.md's promise exactly: every connection is
  pinged every `heartbeat` seconds, and one that sent nothing within `timeout` seconds
  after a ping is told `timed_out` (it closes with 4000).
- The sweeps start with the first client and end when the hub closes (`aclose`, from the
  app's lifespan); a sweep never awaits a client, so one slow client cannot delay the rest,
  and a client that fails in a sweep is contained (`_failed`): it alone is closed with
  1011, and the sweep goes on for the others.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

log = logging.getLogger(__name__)

# Producer checks (a storage round trip each) run at most this many at a time per sweep.
PRODUCER_CHECKS_AT_ONCE: Final = 64
CLOSE_INTERNAL_ERROR: Final = 1011  # PROTOCOL.md (the hub imports nothing of the protocol)


class LiveClient(Protocol):
    def request_close(self, code: int, reason: str = "") -> None: ...


class HeartbeatClient(LiveClient, Protocol):
    user: str

    def ping(self, t: int) -> None:
        """Queue a `ping` frame with `t` (ms since the epoch)."""

    def silent_since(self, sent: float) -> bool:
        """Whether nothing was received from the client since `sent` (time.monotonic())."""

    def timed_out(self) -> None:
        """The client missed a heartbeat: count it and close with 4000."""


class Watched(Protocol):
    def watch(self, now: float, interval: float, producer_silence: float) -> list[str]:
        """One watch round (see `Delivery.watch`): streams whose producer must be checked."""

    async def check_producer(self, stream: str) -> None: ...


class Hub:
    def __init__(self) -> None:
        self.websockets: set[HeartbeatClient] = set()
        self.sse: set[LiveClient] = set()
        self.draining = False
        self._per_user: dict[str, int] = {}  # WebSocket connections per user
        self._deliveries: set[Watched] = set()
        self._empty = asyncio.Event()  # no client at all
        self._empty.set()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._closed = False
        # Told the place of each failure a sweep contained (the app counts them).
        self.on_failure: Callable[[str], None] = lambda place: None

    # ---- membership ----------------------------------------------------------------------

    def connections_of(self, user: str) -> int:
        """Open WebSocket connections of `user` (for the per-user cap)."""
        return self._per_user.get(user, 0)

    def join_websocket(self, client: HeartbeatClient, heartbeat: float, timeout: float) -> None:
        """`client` is pinged every `heartbeat` s and must answer within `timeout` s (the
        process's settings: the first join starts the sweep with them)."""
        self.websockets.add(client)
        self._per_user[client.user] = self._per_user.get(client.user, 0) + 1
        self._empty.clear()
        if self._heartbeat_task is None and not self._closed:
            self._heartbeat_task = asyncio.create_task(
                self._heartbeats(heartbeat, timeout), name="heartbeat sweep"
            )

    def leave_websocket(self, client: HeartbeatClient) -> None:
        if client in self.websockets:
            self.websockets.discard(client)
            left = self._per_user.get(client.user, 1) - 1
            if left > 0:
                self._per_user[client.user] = left
            else:
                self._per_user.pop(client.user, None)
        self._left()

    def join_sse(self, client: LiveClient) -> None:
        self.sse.add(client)
        self._empty.clear()

    def leave_sse(self, client: LiveClient) -> None:
        self.sse.discard(client)
        self._left()

    def watch(self, delivery: Watched, interval: float, producer_silence: float) -> None:
        """Include `delivery` in the watch sweep (every `interval` s) until `unwatch`."""
        self._deliveries.add(delivery)
        if self._watch_task is None and not self._closed:
            self._watch_task = asyncio.create_task(
                self._watches(interval, producer_silence), name="watch sweep"
            )

    def unwatch(self, delivery: Watched) -> None:
        self._deliveries.discard(delivery)

    def _left(self) -> None:
        if not self.websockets and not self.sse:
            self._empty.set()

    # ---- shutdown ------------------------------------------------------------------------

    async def close_all(self, code: int, reason: str, timeout: float) -> None:
        """Ask every client to close (WebSockets with `code`); wait at most `timeout`."""
        self.draining = True
        for client in [*self.websockets, *self.sse]:
            client.request_close(code, reason)
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        except TimeoutError:
            pass

    async def aclose(self) -> None:
        """Stop the sweeps (the app's lifespan calls this when it ends)."""
        self._closed = True
        sweeps = [t for t in (self._heartbeat_task, self._watch_task) if t is not None]
        self._heartbeat_task = self._watch_task = None
        for task in sweeps:
            task.cancel()
        await asyncio.gather(*sweeps, return_exceptions=True)

    # ---- the sweeps ----------------------------------------------------------------------

    async def _heartbeats(self, interval: float, timeout: float) -> None:
        rounds: deque[float] = deque()  # when each ping round whose check is due was sent
        next_ping = time.monotonic() + interval
        while True:
            due = rounds[0] + timeout if rounds else math.inf
            await asyncio.sleep(max(0.0, min(next_ping, due) - time.monotonic()))
            now = time.monotonic()
            while rounds and rounds[0] + timeout <= now:
                sent = rounds.popleft()
                for client in list(self.websockets):
                    # One that joined after the round was sent counts as heard from then.
                    try:
                        if client.silent_since(sent):
                            client.timed_out()
                    except Exception as exc:
                        self._failed(client, "checking its heartbeat", exc)
            if now >= next_ping:
                t = int(time.time() * 1000)
                for client in list(self.websockets):
                    try:
                        client.ping(t)
                    except Exception as exc:
                        self._failed(client, "pinging it", exc)
                rounds.append(now)
                next_ping = now + interval

    def _failed(self, client: LiveClient, doing: str, exc: Exception) -> None:
        """A client failed in a sweep: close it alone with 1011, log it once, count it."""
        self.on_failure("connection")
        log.error("a connection failed while %s; closing it with 1011", doing, exc_info=exc)
        try:
            client.request_close(CLOSE_INTERNAL_ERROR, "internal error; reconnect")
        except Exception:
            log.exception("a connection failed while closing after a failure")

    async def _watches(self, interval: float, producer_silence: float) -> None:
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            checks = []
            for delivery in list(self._deliveries):
                try:
                    checks += [
                        (delivery, s) for s in delivery.watch(now, interval, producer_silence)
                    ]
                except Exception:
                    # Its streams are not re-read this round; the next round tries again.
                    self.on_failure("delivery")
                    log.exception("a delivery failed in the watch sweep")
            # Rare (a stream silent for 1.5 leases), concurrent and bounded: a slow storage
            # must not hold up one check behind another.
            for start in range(0, len(checks), PRODUCER_CHECKS_AT_ONCE):
                batch = checks[start : start + PRODUCER_CHECKS_AT_ONCE]
                results = await asyncio.gather(
                    *(d.check_producer(stream) for d, stream in batch), return_exceptions=True
                )
                for result in results:
                    if isinstance(result, Exception):
                        log.warning("producer check failed: %r", result)
