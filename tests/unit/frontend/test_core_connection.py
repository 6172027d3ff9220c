# Reconnect decisions and backoff (runs under CPython and MicroPython).

from tokenwire.core.backoff import Backoff
from tokenwire.core.connection import (
    CONNECT_TIMEOUT,
    WS_FAILURES_FOR_SSE,
    WS_RETRY_AFTER,
    Connection,
)


def half():
    return 0.5  # jitter centred: delays are exactly the schedule


def test_backoff_schedule_and_reset():
    b = Backoff(half)
    assert [b.next_delay() for _ in range(8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    b.opened(100.0)
    assert b.closed(101.0) is False  # not stable: keeps going
    assert b.next_delay() == 30.0
    b.opened(200.0)
    assert b.closed(260.0) is True
    assert b.next_delay() == 1.0


def test_backoff_jitter_stays_within_bounds():
    for r in (0.0, 0.25, 0.999):
        b = Backoff(lambda r=r: r)
        d = b.next_delay()
        assert 0.8 <= d <= 1.2


def test_first_retry_after_a_good_connection_is_immediate_then_backoff():
    c = Connection(half)
    assert c.start(0.0) == ("connect", 0, "ws")
    c.opened(0.1)
    assert c.closed(50.0, 1006) == ("connect", 0, "ws")
    assert c.reconnecting
    # That attempt fails without opening: back off.
    assert c.closed(50.1, 1006) == ("connect", 1.0, "ws")
    assert c.closed(51.2, 1006) == ("connect", 2.0, "ws")


def test_going_away_reconnects_at_once():
    c = Connection(half)
    c.start(0.0)
    c.opened(0.1)
    assert c.closed(5.0, 1001) == ("connect", 0, "ws")
    c.opened(5.1)
    assert c.closed(60.0, 1001) == ("connect", 0, "ws")


def test_policy_close_stops():
    c = Connection(half)
    c.start(0.0)
    assert c.closed(0.5, 1008) is None
    assert c.online(1.0) is None
    assert c.closed(2.0, 1006) is None


def test_online_event_connects_now_unless_open():
    c = Connection(half)
    c.start(0.0)
    c.opened(0.1)
    assert c.online(1.0) is None
    c.closed(2.0, 1006)
    assert c.online(2.5) == ("connect", 0, "ws")


def test_watchdog_drops_a_silent_connection():
    c = Connection(half, heartbeat_timeout=10.0)
    c.start(0.0)
    c.opened(0.0)
    c.frame(1.0, heartbeat=5.0)
    assert c.tick(15.9) is None
    assert c.tick(16.1) == ("drop",)
    c.frame(20.0, heartbeat=0.5, heartbeat_timeout=0.5)  # a hello with the server's values
    assert c.tick(20.9) is None
    assert c.tick(21.1) == ("drop",)


def test_falls_back_to_sse_after_repeated_ws_failures_and_retries_ws_later():
    c = Connection(half)
    c.start(0.0)
    t = 0.0
    decision = None
    for _ in range(WS_FAILURES_FOR_SSE):
        t += 1.0
        decision = c.closed(t, 1006)
    assert decision[2] == "sse"
    c.opened(t + 0.5)
    assert c.transport == "sse"
    assert c.retry_ws(t + 1.0) is None
    assert c.retry_ws(t + WS_RETRY_AFTER + 1.0) == ("connect", 0, "ws")
    # One more WebSocket failure and it is back to SSE.
    assert c.closed(t + WS_RETRY_AFTER + 2.0, 1006)[2] == "sse"


def test_failures_while_the_server_is_unreachable_do_not_switch_to_sse():
    # The server (or the network) was down: WebSocket is not to blame. Only failures
    # while plain HTTP works mean something blocks WebSocket.
    c = Connection(half)
    c.start(0.0)
    c.opened(0.1)
    assert c.closed(5.0, 1006, reachable=False) == ("connect", 0, "ws")  # lost a good one
    delays = []
    for i in range(WS_FAILURES_FOR_SSE + 3):
        decision = c.closed(6.0 + i, 1006, reachable=False)
        assert decision[2] == "ws"
        delays.append(decision[1])
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]  # backing off all the while
    c.opened(40.0)
    assert c.transport == "ws"
    assert c.closed(60.0, 1006) == ("connect", 0, "ws")  # it had been stable: at once
    # Now the server answers HTTP, yet WebSocket keeps failing: that is what SSE is for.
    transports = [c.closed(61.0 + i, 1006, reachable=True)[2] for i in range(WS_FAILURES_FOR_SSE)]
    assert transports == ["ws"] * (WS_FAILURES_FOR_SSE - 1) + ["sse"]


def test_offline_event_drops_an_open_websocket_at_once():
    c = Connection(half)
    assert c.offline(0.0) is None  # nothing to drop yet
    c.start(0.0)
    c.opened(0.1)
    assert c.offline(1.0) == ("drop",)
    assert c.closed(1.0, 4000) == ("connect", 0, "ws")
    assert c.reconnecting
    assert c.offline(1.1) is None  # not open: the attempt fails on its own


def test_an_attempt_that_never_opens_is_given_up():
    # A black-holed network completes no handshake and reports nothing.
    c = Connection(half)
    assert c.start(0.0) == ("connect", 0, "ws")
    assert c.tick(CONNECT_TIMEOUT - 0.5) is None
    assert c.tick(CONNECT_TIMEOUT + 0.5) == ("drop",)
    assert c.tick(CONNECT_TIMEOUT + 1.5) is None  # once: the `closed` report decides next
    decision = c.closed(CONNECT_TIMEOUT + 2.0, None, reachable=False)
    assert decision == ("connect", 1.0, "ws")
    # The deadline counts from when the delayed attempt starts.
    t = CONNECT_TIMEOUT + 2.0 + 1.0
    assert c.tick(t + CONNECT_TIMEOUT - 0.5) is None
    assert c.tick(t + CONNECT_TIMEOUT + 0.5) == ("drop",)
    c.opened(t + 1.0)
    assert c.tick(t + 1.5) is None


def test_reconnecting_is_shown_once_an_attempt_failed_even_if_never_connected():
    # A page loaded offline (from the service worker) was never connected.
    c = Connection(half)
    c.start(0.0)
    assert not c.reconnecting
    c.closed(0.1, 1006, reachable=False)
    assert c.reconnecting
    c.opened(2.0)
    assert not c.reconnecting
