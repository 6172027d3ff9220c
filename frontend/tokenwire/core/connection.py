"""When to connect, reconnect, give up on WebSocket, and what to tell the user. Pure.

The browser layer reports what happened (`opened`, `frame`, `closed`, `online`, `tick`)
with the current time in seconds, and carries out the returned decision:

- ("connect", delay, transport): open a connection of `transport` ("ws" or "sse")
  after `delay` seconds (0 = now);
- ("drop",): the connection is dead without having said so: close it; a `closed` report
  follows;
- None: nothing to do.

Rules (PROTOCOL.md and the client issue): reconnect at once after a close or the window's
`online` event, then back off 1, 2, 4, 8, 16, 30 ... s with jitter; 1001 (server going
away) reconnects at once every time; 1008 (policy) stops; no frame for heartbeat +
timeout means dead. After `WS_FAILURES_FOR_SSE` WebSocket attempts in a row that never
opened, the client falls back to SSE, and tries WebSocket again after `WS_RETRY_AFTER`.
"""

from tokenwire.core.backoff import Backoff

DEFAULT_HEARTBEAT = 30.0
DEFAULT_HEARTBEAT_TIMEOUT = 10.0
WS_FAILURES_FOR_SSE = 3
WS_RETRY_AFTER = 60.0
GOING_AWAY_WINDOW = 2.0  # a second 1001 this soon backs off: the server may be draining

CLOSED = "closed"
CONNECTING = "connecting"
OPEN = "open"
STOPPED = "stopped"  # refused by policy: do not loop


class Connection:
    def __init__(self, random, heartbeat_timeout=DEFAULT_HEARTBEAT_TIMEOUT):
        self.backoff = Backoff(random)
        self.state = CLOSED
        self.transport = "ws"
        self.heartbeat = DEFAULT_HEARTBEAT
        self.heartbeat_timeout = heartbeat_timeout
        self.ws_failures = 0  # WebSocket attempts in a row that never opened
        self.sse_since = None
        self.last_frame = 0.0
        self.ever_opened = False
        self._opened_this_attempt = False
        self._immediate_used = False
        self._last_going_away = -1e9

    @property
    def reconnecting(self):
        """Show the subtle "Reconnecting..." indicator."""
        return self.ever_opened and self.state != OPEN

    def start(self, now):
        return self._attempt(0)

    def _attempt(self, delay):
        self.state = CONNECTING
        self._opened_this_attempt = False
        return ("connect", delay, self.transport)

    def opened(self, now):
        self.state = OPEN
        self.ever_opened = True
        self._opened_this_attempt = True
        self.last_frame = now
        self.backoff.opened(now)
        if self.transport == "ws":
            self.ws_failures = 0

    def frame(self, now, heartbeat=None, heartbeat_timeout=None):
        """Any frame arrived; `hello` also brings the server's heartbeat settings."""
        self.last_frame = now
        if heartbeat:
            self.heartbeat = heartbeat
        if heartbeat_timeout:
            self.heartbeat_timeout = heartbeat_timeout

    def closed(self, now, code=None):
        """The connection ended (or an attempt failed). Decide the next attempt."""
        if self.state == STOPPED:
            return None
        was_open = self._opened_this_attempt
        if self.backoff.closed(now):
            self._immediate_used = False  # it had been stable: a fresh start
        if code == 1008:
            self.state = STOPPED
            return None
        if self.transport == "ws" and not was_open:
            self.ws_failures += 1
            if self.ws_failures >= WS_FAILURES_FOR_SSE:
                self.transport, self.sse_since = "sse", now
                self.backoff.reset()
        elif self.transport == "sse" and now - self.sse_since >= WS_RETRY_AFTER:
            # Try WebSocket again; one more failure and it is back to SSE.
            self.transport, self.ws_failures = "ws", WS_FAILURES_FOR_SSE - 1
        going_away = code == 1001 and now - self._last_going_away > GOING_AWAY_WINDOW
        if code == 1001:
            self._last_going_away = now
        if going_away:
            delay = 0  # a deploy: the next node is ready now
        elif was_open and not self._immediate_used:
            delay = 0  # the first retry after losing a good connection is immediate
            self._immediate_used = True
        else:
            delay = self.backoff.next_delay()
        return self._attempt(delay)

    def online(self, now):
        """The browser says the network is back: try now unless already connected."""
        if self.state == OPEN or self.state == STOPPED:
            return None
        return self._attempt(0)

    def retry_ws(self, now):
        """In SSE mode, every WS_RETRY_AFTER seconds: try WebSocket again (one failure and
        it is back to SSE)."""
        if self.transport != "sse" or self.state != OPEN or now - self.sse_since < WS_RETRY_AFTER:
            return None
        self.transport, self.ws_failures = "ws", WS_FAILURES_FOR_SSE - 1
        return self._attempt(0)

    def tick(self, now):
        """Called every second or so: the heartbeat watchdog."""
        if self.state == OPEN and now - self.last_frame > self.heartbeat + self.heartbeat_timeout:
            return ("drop",)
        return None
