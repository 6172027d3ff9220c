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
timeout means dead, and so does the window's `offline` event; an attempt still not open
after `CONNECT_TIMEOUT` is given up (a black-holed network never answers the handshake).
After `WS_FAILURES_FOR_SSE` WebSocket attempts in a row that never opened while the server
answered plain HTTP (the browser layer probes it: `reachable`), the client falls back to
SSE, and tries WebSocket again after `WS_RETRY_AFTER`. Attempts that failed because the
server or the network was down say nothing about WebSocket and do not count: otherwise
every outage longer than a few seconds would leave the client on SSE.
"""

from tokenwire.core.backoff import Backoff

DEFAULT_HEARTBEAT = 30.0
DEFAULT_HEARTBEAT_TIMEOUT = 10.0
WS_FAILURES_FOR_SSE = 3
WS_RETRY_AFTER = 60.0
CONNECT_TIMEOUT = 10.0  # seconds an attempt may take to open
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
        self.connect_deadline = None  # when the current attempt is given up, if not open
        self.ever_opened = False
        self.ever_failed = False
        self._opened_this_attempt = False
        self._immediate_used = False
        self._last_going_away = -1e9

    @property
    def reconnecting(self):
        """Show the subtle "Reconnecting..." indicator: not connected, and either it had
        been or an attempt has failed (a page loaded offline, from the service worker)."""
        return (self.ever_opened or self.ever_failed) and self.state != OPEN

    def start(self, now):
        return self._attempt(now, 0)

    def _attempt(self, now, delay):
        self.state = CONNECTING
        self._opened_this_attempt = False
        self.connect_deadline = now + delay + CONNECT_TIMEOUT
        return ("connect", delay, self.transport)

    def opened(self, now):
        self.state = OPEN
        self.connect_deadline = None
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

    def closed(self, now, code=None, reachable=True):
        """The connection ended (or an attempt failed). Decide the next attempt.
        `reachable`: for a WebSocket attempt that never opened, whether the server
        answered plain HTTP just after (if not, the failure does not count against
        WebSocket)."""
        if self.state == STOPPED:
            return None
        self.ever_failed = True
        was_open = self._opened_this_attempt
        if self.backoff.closed(now):
            self._immediate_used = False  # it had been stable: a fresh start
        if code == 1008:
            self.state = STOPPED
            return None
        if self.transport == "ws" and not was_open:
            if not reachable:
                return self._attempt(now, self.backoff.next_delay())
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
        return self._attempt(now, delay)

    def online(self, now):
        """The browser says the network is back: try now unless already connected."""
        if self.state == OPEN or self.state == STOPPED:
            return None
        return self._attempt(now, 0)

    def offline(self, now):
        """The browser says the network is gone. An open WebSocket shows no sign of it (its
        frames are held), so drop it now rather than after the watchdog's wait: the user
        sees "Reconnecting..." at once, and messages typed meanwhile stay queued (and can
        be cancelled) instead of vanishing into a held socket."""
        if self.transport == "ws" and self.state == OPEN:
            return ("drop",)
        return None

    def retry_ws(self, now):
        """In SSE mode, every WS_RETRY_AFTER seconds: try WebSocket again (one failure and
        it is back to SSE)."""
        if self.transport != "sse" or self.state != OPEN or now - self.sse_since < WS_RETRY_AFTER:
            return None
        self.transport, self.ws_failures = "ws", WS_FAILURES_FOR_SSE - 1
        return self._attempt(now, 0)

    def tick(self, now):
        """Called every second or so: the heartbeat watchdog, and the attempt's deadline."""
        if self.state == OPEN and now - self.last_frame > self.heartbeat + self.heartbeat_timeout:
            return ("drop",)
        deadline = self.connect_deadline
        if self.state == CONNECTING and deadline is not None and now > deadline:
            self.connect_deadline = None  # one drop per attempt; `closed` decides next
            return ("drop",)
        return None
