"""When a connection's sender wakes for new tokens: at once while the process is quiet, on
one shared tick under load.

Frames, not tokens, are what a server pays for (FIELD-NOTES.md: one frame costs about the
same with one token or ten). While few tokens flow, every token wakes its connection's
sender at once and leaves in its own frame: no added delay. Once the process is asked to
wake senders more than `busy_rate` times a second, wake-ups wait for the next tick (one
timer for the whole process): meanwhile each connection's outbox joins the tokens that
arrive into its pending frame, so a stream at 50 tokens/s sends about `50 * tick` tokens
per frame, and the process sends at most one frame per connection per tick. The delay
that adds is at most one tick. Below half of `busy_rate` the process is quiet again
(hysteresis, so it does not flip at every window).

Only live tokens and stream ends wait for the tick. Control frames (hello, ack, pong,
errors) and catch-up from the log wake the sender at once.

Deliberate choices a reader might want to "fix":

- One ticker per event loop, made on first use, and no task: a pending tick is one
  `call_later` handle that only sets events, harmless if its senders are gone.
- The load measure is the rate of wake requests (token events reaching an outbox), not the
  event loop's lag: it needs no probe, and it rises before the loop is saturated.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Final

DEFAULT_TICK: Final = 0.03  # seconds between flushes under load: the most a token waits
# Wake requests per second above which senders tick: 100 streams of 50 tokens/s (5,000)
# stay well below it, so light load never waits for a tick.
DEFAULT_BUSY_RATE: Final = 12_000.0
WINDOW: Final = 0.1  # seconds over which the rate is measured


class FlushTicker:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        tick: float = DEFAULT_TICK,
        busy_rate: float = DEFAULT_BUSY_RATE,
        window: float = WINDOW,
    ) -> None:
        self.tick = tick
        self.window = window
        self._loop = loop
        self._enter = busy_rate * window  # requests in one window that make it busy
        self._leave = self._enter / 2  # ... and that make it quiet again
        self._requests = 0
        self._window_end = 0.0
        self.busy = False
        self._pending: dict[asyncio.Event, None] = {}  # insertion-ordered set
        self._timer: asyncio.TimerHandle | None = None

    def wake(self, event: asyncio.Event) -> None:
        """A sender waiting on `event` has something new to send."""
        self._requests += 1
        if self.busy and (event.is_set() or event in self._pending):
            # The hottest case under load, so no clock read: awake already, or queued for
            # the tick, the sender takes what was joined when it runs.
            return
        now = self._loop.time()
        if now >= self._window_end:
            self._measure(now)
        if not self.busy:
            event.set()
            return
        self._pending[event] = None
        if self._timer is None:
            self._timer = self._loop.call_at(now + self.tick, self._flush)

    def _measure(self, now: float) -> None:
        # A window that ended long ago counts as empty: the process was quiet meanwhile.
        requests = self._requests if now < self._window_end + self.window else 0
        if self.busy:
            self.busy = requests >= self._leave
        else:
            self.busy = requests > self._enter
        self._requests = 0
        self._window_end = now + self.window
        if not self.busy:
            self._flush()  # nobody waits for a tick that is no longer needed

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        for event in pending:
            event.set()


_tickers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FlushTicker] = (
    weakref.WeakKeyDictionary()
)


_last: FlushTicker | None = None  # the one found last: one loop per process, in practice


def ticker() -> FlushTicker:
    """The running loop's ticker."""
    global _last
    loop = asyncio.get_running_loop()
    if _last is not None and _last._loop is loop:
        return _last
    found = _tickers.get(loop)
    if found is None:
        found = _tickers[loop] = FlushTicker(loop)
    _last = found
    return found
