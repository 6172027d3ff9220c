"""The hub's process-wide sweeps and bookkeeping, driven with small real clients (the live
server's behaviour, 4000 on a missed heartbeat, is in tests/integration/test_websocket.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from backend.delivery.hub import Hub
from backend.delivery.lean_event import LeanEvent
from harness.server import wait_for

TIMEOUT = 5.0


class Client:
    """Records what the hub asked of it; `answers` says whether it replies to pings."""

    def __init__(self, user: str, answers: bool) -> None:
        self.user = user
        self.answers = answers
        self.pings: list[int] = []
        self.last_received = time.monotonic()
        self.timeouts = 0
        self.close_requests: list[int] = []

    def ping(self, t: int) -> None:
        self.pings.append(t)
        if self.answers:
            self.last_received = time.monotonic()

    def silent_since(self, sent: float) -> bool:
        return self.last_received < sent

    def timed_out(self) -> None:
        self.timeouts += 1
        self.answers = True  # as a closing connection: it is not timed out twice

    def request_close(self, code: int, reason: str = "") -> None:
        self.close_requests.append(code)


async def test_heartbeat_pings_everyone_and_times_out_only_the_silent() -> None:
    hub = Hub()
    alive, silent = Client("a", answers=True), Client("b", answers=False)
    hub.join_websocket(alive, 0.05, 0.05)
    hub.join_websocket(silent, 0.05, 0.05)
    try:
        await wait_for(lambda: silent.timeouts == 1 and len(alive.pings) >= 4)
        assert alive.timeouts == 0
        assert len(silent.pings) >= 1
        # Later rounds do not time it out again once it is closing.
        rounds = len(alive.pings)
        await wait_for(lambda: len(alive.pings) >= rounds + 3)
        assert silent.timeouts == 1
    finally:
        await hub.aclose()


async def test_a_client_joining_after_a_ping_is_not_judged_by_that_round() -> None:
    hub = Hub()
    first = Client("a", answers=True)
    hub.join_websocket(first, 0.05, 0.2)
    try:
        await wait_for(lambda: len(first.pings) == 1)
        late = Client("b", answers=False)  # joined after the round was sent
        hub.join_websocket(late, 0.05, 0.2)
        await wait_for(lambda: len(late.pings) >= 1)
        assert late.timeouts == 0  # the first round's check (at 0.25 s) left it alone
        await wait_for(lambda: late.timeouts == 1)  # its own first ping went unanswered
    finally:
        await hub.aclose()


async def test_connections_per_user_and_close_all_waits_for_them_to_leave() -> None:
    hub = Hub()
    clients = [Client("a", True), Client("a", True), Client("b", True)]
    for c in clients:
        hub.join_websocket(c, 60, 60)
    assert (hub.connections_of("a"), hub.connections_of("b"), hub.connections_of("c")) == (2, 1, 0)
    hub.leave_websocket(clients[0])
    hub.leave_websocket(clients[0])  # twice: counted once
    assert hub.connections_of("a") == 1

    async def leave_soon() -> None:
        await asyncio.sleep(0.05)
        for c in clients[1:]:
            hub.leave_websocket(c)

    leaving = asyncio.create_task(leave_soon())
    began = time.monotonic()
    await hub.close_all(1001, "bye", timeout=TIMEOUT)
    await leaving
    assert time.monotonic() - began < TIMEOUT
    assert [c.close_requests for c in clients] == [[], [1001], [1001]]
    assert hub.draining and not hub.websockets and hub.connections_of("a") == 0
    await hub.aclose()


async def test_close_all_gives_up_after_its_timeout() -> None:
    hub = Hub()
    stuck = Client("a", True)
    hub.join_websocket(stuck, 60, 60)
    await hub.close_all(1001, "bye", timeout=0.05)
    assert stuck.close_requests == [1001]
    assert hub.websockets == {stuck}
    await hub.aclose()


class Watched:
    def __init__(self, silent: list[str]) -> None:
        self.silent = silent
        self.rounds = 0
        self.checked: list[str] = []

    def watch(self, now: float, interval: float, producer_silence: float) -> list[str]:
        self.rounds += 1
        return self.silent

    async def check_producer(self, stream: str) -> None:
        self.checked.append(stream)


async def test_watch_sweep_rounds_and_producer_checks_until_unwatched() -> None:
    hub = Hub()
    quiet, stuck = Watched([]), Watched(["s1", "s2"])
    hub.watch(quiet, 0.02, 1.0)
    hub.watch(stuck, 0.02, 1.0)
    try:
        await wait_for(lambda: quiet.rounds >= 2 and stuck.checked[:2] == ["s1", "s2"])
        hub.unwatch(stuck)
        # A round in flight may still visit `stuck`; two more rounds of `quiet` mean a
        # whole round began after the unwatch.
        after = quiet.rounds
        await wait_for(lambda: quiet.rounds >= after + 2)
        rounds = stuck.rounds
        await wait_for(lambda: quiet.rounds >= rounds + 3)
        assert stuck.rounds == rounds
    finally:
        await hub.aclose()
    ended = quiet.rounds
    await asyncio.sleep(0.06)
    assert quiet.rounds == ended  # the sweep ended with the hub


async def test_lean_event_behaves_as_an_asyncio_event() -> None:
    event = LeanEvent()
    assert not event.is_set()
    waiters = [asyncio.create_task(event.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    event.set()
    assert await asyncio.gather(*waiters) == [True, True, True]
    assert await event.wait() is True  # set: returns at once
    event.clear()
    cancelled = asyncio.create_task(event.wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    later = asyncio.create_task(event.wait())
    await asyncio.sleep(0)
    event.set()
    assert await asyncio.wait_for(later, TIMEOUT) is True


class Broken(Client):
    """A client whose ping raises, as a bug in one connection's machinery would."""

    def ping(self, t: int) -> None:
        raise RuntimeError("a broken connection")


async def test_a_client_failing_in_the_sweep_is_closed_alone_and_the_sweep_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = Hub()
    failures: list[str] = []
    hub.on_failure = failures.append
    broken, alive = Broken("a", answers=True), Client("b", answers=True)
    hub.join_websocket(broken, 0.05, 0.05)
    hub.join_websocket(alive, 0.05, 0.05)
    try:
        # Round after round, the other client is still pinged.
        await wait_for(lambda: len(alive.pings) >= 3)
        assert 1011 in broken.close_requests and alive.close_requests == []
        assert failures and set(failures) == {"connection"}
        assert len(failures) == broken.close_requests.count(1011)
        assert "a connection failed while pinging it" in caplog.text
    finally:
        await hub.aclose()
