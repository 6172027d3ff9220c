"""Reconnect delays: 1, 2, 4, 8, 16, 30, 30 ... seconds with jitter, reset once stable.

Pure: the caller passes a random() function and the current time; nothing sleeps here.
"""

SCHEDULE = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
JITTER = 0.2  # each delay is drawn from [d * (1 - JITTER), d * (1 + JITTER)]
STABLE_AFTER = 10.0  # seconds a connection must stay open to reset the schedule


class Backoff:
    def __init__(self, random, schedule=SCHEDULE, jitter=JITTER, stable_after=STABLE_AFTER):
        self._random = random
        self._schedule = schedule
        self._jitter = jitter
        self._stable_after = stable_after
        self.attempt = 0
        self._opened_at = None

    def next_delay(self):
        """Seconds to wait before the next attempt; each call moves along the schedule."""
        base = self._schedule[min(self.attempt, len(self._schedule) - 1)]
        self.attempt += 1
        return base * (1 - self._jitter + 2 * self._jitter * self._random())

    def opened(self, now):
        self._opened_at = now

    def closed(self, now):
        """A connection closed: if it had been stable, start the schedule over (True)."""
        stable = self._opened_at is not None and now - self._opened_at >= self._stable_after
        if stable:
            self.attempt = 0
        self._opened_at = None
        return stable

    def reset(self):
        self.attempt = 0
