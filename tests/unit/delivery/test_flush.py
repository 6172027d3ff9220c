"""The flush ticker: senders wake at once while the process is quiet, once per tick under
load, and at once again when the load is gone. On a real event loop, with short ticks."""

from __future__ import annotations

import asyncio

from backend.delivery.flush import FlushTicker, ticker

TIMEOUT = 5.0
TICK = 0.05
WINDOW = 0.2
# 10 wake requests in one window make the ticker busy; 5 or more keep it busy.
BUSY_RATE = 10 / WINDOW


def make() -> FlushTicker:
    return FlushTicker(asyncio.get_running_loop(), tick=TICK, busy_rate=BUSY_RATE, window=WINDOW)


async def next_window(flush: FlushTicker) -> None:
    await asyncio.sleep(flush.window * 1.1)


async def make_busy(flush: FlushTicker) -> None:
    """More than the busy rate's requests in one window, then the next window starts."""
    events = [asyncio.Event() for _ in range(11)]
    await next_window(flush)
    for event in events:
        flush.wake(event)
    await next_window(flush)
    flush.wake(asyncio.Event())  # the first request of the new window measures the last
    assert flush.busy


async def test_a_quiet_process_wakes_senders_at_once() -> None:
    flush = make()
    events = [asyncio.Event() for _ in range(10)]  # 10: not more than the busy rate
    for event in events:
        flush.wake(event)
        assert event.is_set()
    await next_window(flush)
    event = asyncio.Event()
    flush.wake(event)
    assert event.is_set()
    assert not flush.busy


async def test_under_load_senders_wait_for_the_tick() -> None:
    flush = make()
    await make_busy(flush)
    loop = asyncio.get_running_loop()
    waiting = [asyncio.Event() for _ in range(3)]
    asked = loop.time()
    for event in waiting:
        flush.wake(event)
        flush.wake(event)  # asked twice in one tick: still one wake-up
    assert not any(event.is_set() for event in waiting)
    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(*(event.wait() for event in waiting))
    # Woken by the tick, not before it (the loop may be late, never early).
    assert loop.time() - asked >= TICK * 0.9


async def test_an_awake_sender_is_not_queued_for_the_tick() -> None:
    flush = make()
    await make_busy(flush)
    awake = asyncio.Event()
    awake.set()
    flush.wake(awake)
    awake.clear()  # the sender took its frame and waits again: nothing was queued for it
    sleeper = asyncio.Event()
    flush.wake(sleeper)
    async with asyncio.timeout(TIMEOUT):
        await sleeper.wait()
    assert not awake.is_set()


async def test_the_load_gone_senders_wake_at_once_again() -> None:
    flush = make()
    await make_busy(flush)
    queued = asyncio.Event()
    flush.wake(queued)
    assert not queued.is_set()
    # A window with fewer than half the busy rate's requests: quiet again. The first
    # request after it finds the process quiet and wakes at once, along with whoever
    # was still waiting for a tick.
    await next_window(flush)
    await next_window(flush)
    event = asyncio.Event()
    flush.wake(event)
    assert not flush.busy
    assert event.is_set() and queued.is_set()


async def test_busy_stays_busy_between_half_and_the_full_rate() -> None:
    flush = make()
    await make_busy(flush)
    for _ in range(3):
        for _ in range(6):  # at least half the busy rate (5) in each window
            flush.wake(asyncio.Event())
        await next_window(flush)
        flush.wake(asyncio.Event())
        assert flush.busy


async def test_one_ticker_per_event_loop() -> None:
    assert ticker() is ticker()
    other = await asyncio.to_thread(asyncio.run, _ticker_of_a_new_loop())
    assert other is not ticker()


async def _ticker_of_a_new_loop() -> FlushTicker:
    return ticker()
