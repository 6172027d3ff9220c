"""Several server nodes acting as one through Redis: real uvicorn processes, one real
`redis-server`, and an in-test TCP balancer in front of them (tests/support/balancer.py).

What a user sees is checked as in the single-node tests: the demo model's text for the
prompt, exactly once, in order, whichever node runs the generation and whichever node the
user's connections land on; or, when a node or Redis dies, an `error` frame, never a
silent gap.

Nodes share one secret (start_server sets the same TOKENWIRE_SECRET for every server), so
an identity cookie from one node is valid on all. Node names are unique per test because
the nodes of different tests share the session's Redis, where leases name their node.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Final, TypeVar

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from backend.providers import demo_reply, demo_tokens
from harness.redis_server import RedisServer
from harness.server import (
    TIMEOUT,
    Client,
    Server,
    StreamView,
    free_port,
    new_id,
    start_server,
    wait_for,
)
from tests.conftest import FAST_DEMO
from tests.support.balancer import Balancer

SECRET: Final = "multinode-secret-0123456789abcdef"
# Short heartbeats and leases so that dead peers are noticed within a test's patience.
NODE_SETTINGS: Final[dict[str, Any]] = {
    **FAST_DEMO,
    "secret": SECRET,
    "heartbeat": 1,
    "heartbeat_timeout": 1,
    "lease_seconds": 1,
}
# A dead node's streams end for their readers within about 2-3 lease periods; generous.
PRODUCER_LOST_DEADLINE: Final = 15.0
# Redis down or back: how long the nodes may take to notice.
REDIS_NOTICE_DEADLINE: Final = 15.0
POLL: Final = 0.05
# The errors that tell a client its answer is cut short and may be retried (PROTOCOL.md):
# the log is gone, or its producer. `not_found` would say the stream never was the user's.
INCOMPLETE_ANSWER_CODES: Final = ("stream_expired", "provider_error")
LATENCY_CHATS: Final = 200
LATENCY_WARMUP: Final = 10

T = TypeVar("T")


# ---- nodes and helpers ---------------------------------------------------------------


def node_name(label: str) -> str:
    return f"{label}-{new_id()[:8]}"


def name_of(server: Server) -> str:
    return server.env["TOKENWIRE_NODE"]


def start_node(make: Callable[..., Server], redis_url: str, label: str, **env: Any) -> Server:
    return make(redis_url=redis_url, node=node_name(label), **{**NODE_SETTINGS, **env})


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[tuple[Server, Server]]:
    """Two nodes on the session's Redis, shared by the tests that kill nothing."""
    tmp = tmp_path_factory.mktemp("cluster")
    started: list[Server] = []

    def make(**env: Any) -> Server:
        srv = start_server(tmp, **env)
        started.append(srv)
        return srv

    try:
        yield start_node(make, redis_url, "a"), start_node(make, redis_url, "b")
    finally:
        for srv in started:
            srv.stop(signal.SIGKILL)


async def request(
    server: Server, method: str, path: str, cookie: str, **kwargs: Any
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        return await asyncio.wait_for(
            http.request(method, path, headers={"Cookie": cookie}, **kwargs), TIMEOUT
        )


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float = TIMEOUT) -> T:
    """Poll the async `check` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s (last: {result!r})")
        await asyncio.sleep(POLL)


async def begin_chat(client: Client, text: str, conversation: str | None = None) -> tuple[str, str]:
    """Send a new chat and wait for its ack; frames of other streams may come first (unlike
    harness.start_chat, which expects the ack next). Returns (stream id, conversation)."""
    stream, conversation = new_id(), conversation or new_id()
    await client.send(type="chat", id=stream, conversation=conversation, text=text)
    ack = await client.until(lambda f: f["type"] in ("ack", "error") and f.get("id") == stream)
    assert ack == {"type": "ack", "id": stream, "conversation": conversation}
    return stream, conversation


def token_of(stream: str, at_least: int = 1) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f["type"] == "token" and f["id"] == stream and f["seq"] >= at_least


def assert_complete(view: StreamView, prompt: str, reason: str = "stop") -> None:
    """The user saw the whole answer, once, in order, and its `done`."""
    assert view.text == demo_reply(prompt)
    assert (view.duplicates, view.gaps) == (0, 0)
    assert view.end is not None
    assert view.end["type"] == "done"
    assert (view.end["seq"], view.end["reason"]) == (len(demo_tokens(prompt)), reason)


async def connect_to(target: Server | Balancer, cookie: str | None = None) -> Client:
    # Client.connect only needs the target's `ws_url`: a node's, or the balancer's.
    return await Client.connect(target, cookie=cookie)  # type: ignore[arg-type]


async def connect_landing_on(
    balancer: Balancer, node: str, cookie: str | None = None, attempts: int = 8
) -> Client:
    """Connect through the balancer until a connection lands on `node`; the others close."""
    for _ in range(attempts):
        client = await connect_to(balancer, cookie)
        if client.hello["node"] == node:
            return client
        await client.close()
    raise AssertionError(f"no connection through the balancer landed on {node}")


async def _read_until_stopped(client: Client, stop: asyncio.Event) -> str | None:
    """Read (and answer pings) until `stop`; None, or how the connection closed."""
    while not stop.is_set():
        try:
            await client.recv(timeout=POLL * 2)  # a cancelled websockets recv loses nothing
        except TimeoutError:
            continue
        except ConnectionClosed as exc:
            return f"closed with code {exc.rcvd.code if exc.rcvd else None}"
    return None


@contextlib.asynccontextmanager
async def reading(*clients: Client) -> AsyncIterator[list[asyncio.Task[str | None]]]:
    """Keep reading `clients` in the background while the test waits on something else, so
    their pings are answered; frames are recorded as by `until`. The tasks are returned:
    one that is done before the block ends saw its connection close."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_read_until_stopped(c, stop)) for c in clients]
    try:
        yield tasks
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=TIMEOUT)
        for task in tasks:
            task.cancel()


async def readyz(server: Server) -> int:
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        return (await asyncio.wait_for(http.get("/readyz"), TIMEOUT)).status_code


async def metrics(server: Server) -> dict[str, float]:
    return await asyncio.wait_for(asyncio.to_thread(server.metrics), TIMEOUT)


# ---- 1. fan-out across nodes -----------------------------------------------------------


async def test_every_frame_reaches_the_users_connection_on_the_other_node(
    cluster: tuple[Server, Server],
) -> None:
    a, b = cluster
    before = [(await metrics(n))["tokenwire_generations_total"] for n in (a, b)]
    x = await connect_to(a)
    y = await connect_to(b, x.cookie)  # the same user, on the other node
    assert (x.hello["node"], y.hello["node"]) == (name_of(a), name_of(b))
    assert x.hello["heartbeat"] == y.hello["heartbeat"] == 1

    prompt = "across the nodes"
    stream, conversation = await begin_chat(x, prompt)
    x_view, y_view = await asyncio.gather(x.until_end(stream), y.until_end(stream))
    assert_complete(x_view, prompt)
    assert_complete(y_view, prompt)
    assert [f for f in y.frames if f["type"] == "message"] == [
        {"type": "message", "id": stream, "conversation": conversation, "text": prompt}
    ]
    assert not any(f["type"] == "message" for f in x.frames)  # not echoed to the sender

    # One generation in the whole cluster, on the node that took the chat; it ends there.
    after = [(await metrics(n))["tokenwire_generations_total"] for n in (a, b)]
    assert after == [before[0] + 1, before[1]]
    await eventually(lambda: _streams_active_is(a, 0))
    for client in (x, y):
        await client.close()


async def _streams_active_is(server: Server, value: float) -> bool:
    return (await metrics(server))["tokenwire_streams_active"] == value


# ---- the balancer itself ---------------------------------------------------------------


async def test_balancer_round_robin_skips_refusing_backends_and_stops_cleanly(
    cluster: tuple[Server, Server],
) -> None:
    a, b = cluster
    to_a, to_b = ("127.0.0.1", a.port), ("127.0.0.1", b.port)
    nobody = ("127.0.0.1", free_port())  # nothing listens there: connections are refused
    balancer = Balancer([to_a, nobody, to_b])
    await balancer.start()
    clients: list[Client] = []
    try:
        for _ in range(4):
            clients.append(await connect_to(balancer))
        assert [c.hello["node"] for c in clients] == [name_of(n) for n in (a, b, a, b)]
        assert (balancer.refused, balancer.connections) == (2, 4)
        balancer.remove(to_a)
        clients.extend([await connect_to(balancer) for _ in range(2)])
        assert [c.hello["node"] for c in clients[4:]] == [name_of(b)] * 2
        balancer.add(to_a)
        clients.extend([await connect_to(balancer) for _ in range(3)])
        assert {c.hello["node"] for c in clients[6:]} == {name_of(a), name_of(b)}
        for i, client in enumerate(clients):  # every pipe carries frames both ways
            await client.send(type="ping", t=i)
            assert await client.until(lambda f: f["type"] == "pong") == {"type": "pong", "t": i}
    finally:
        await asyncio.wait_for(balancer.stop(), TIMEOUT)
    # Stopping cut every live pipe (no close frame: as a network failure looks) and the
    # listener.
    for client in clients:
        assert await client.drain_until_closed() is None
    assert balancer.connections == 0
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", balancer.port), TIMEOUT)


# ---- 2. resume on another node after the connection's node died -----------------------


async def test_resume_through_the_balancer_after_the_connections_node_dies(
    make_server: Callable[..., Server], redis_url: str
) -> None:
    # 100 tokens/s: the default answer lasts about 2.5 s, so the kill lands mid-stream.
    a = start_node(make_server, redis_url, "a", demo_tokens_per_second=100)
    b = start_node(make_server, redis_url, "b", demo_tokens_per_second=100)
    prompt = "survive the node that held my connection"
    async with Balancer([("127.0.0.1", a.port), ("127.0.0.1", b.port)]) as balancer:
        # The user's other tab, directly on B, shows the stream is under way before the
        # follower joins: so the follower's resume after 0 cannot race the first token.
        tab = await connect_to(b)
        cookie = tab.cookie
        body = {"id": new_id(), "conversation": new_id(), "text": prompt}
        response = await request(b, "POST", "/api/chat", cookie, json=body)
        assert response.status_code == 202, response.text
        stream = body["id"]

        async with reading(tab) as tab_reader:
            await wait_for(lambda: tab.view(stream).last >= 10)
            follower = await connect_landing_on(balancer, name_of(a), cookie)
            seen = StreamView()
            await follower.resume(stream, seen)  # after 0: B generates, A's client follows
            await follower.until(token_of(stream, 30))
            assert seen.end is None

            a.stop(signal.SIGKILL)
            # The balancer drops the client's connection when its node's socket dies.
            await follower.drain_until_closed()
            assert seen.end is None, "the kill did not land mid-stream"

            # A refuses now: the page lands on B, and so does a third tab opened meanwhile
            # (two connections in a row, so round robin offers A to one of them).
            refused = balancer.refused
            again = await connect_to(balancer, cookie)
            third = await connect_to(balancer, cookie)
            assert again.hello["node"] == third.hello["node"] == name_of(b)
            assert balancer.refused > refused
            await again.resume(stream, seen)  # the page kept what it showed
            await third.resume(stream, StreamView())  # a new tab shows the whole stream
            view, third_view = await asyncio.gather(
                again.until_end(stream), third.until_end(stream)
            )
            await wait_for(lambda: tab.view(stream).end is not None)
            assert not tab_reader[0].done(), tab_reader[0].result()

        assert view is seen
        assert_complete(view, prompt)
        assert_complete(third_view, prompt)
        assert_complete(tab.view(stream), prompt)
        await wait_for(lambda: balancer.connections == 2)  # `again`, `third`; `tab` is direct
        for client in (again, third, tab):
            await client.close()
        await wait_for(lambda: balancer.connections == 0)


# ---- 3. cancel from another node ------------------------------------------------------


async def test_cancel_on_one_node_stops_the_generation_on_the_other(
    cluster: tuple[Server, Server],
) -> None:
    a, b = cluster
    x = await connect_to(a)
    y = await connect_to(b, x.cookie)
    prompt = "cancel me from the other node"
    stream, conversation = await begin_chat(x, prompt)  # A generates
    await y.until(token_of(stream, 5))
    await y.send(type="cancel", id=stream)
    x_view, y_view = await asyncio.gather(x.until_end(stream), y.until_end(stream))

    full = demo_reply(prompt)
    for view in (x_view, y_view):
        assert view.end == {"type": "done", "id": stream, "seq": view.last, "reason": "cancelled"}
        assert full.startswith(view.text) and len(view.text) < len(full)
        assert (view.duplicates, view.gaps) == (0, 0)
    assert x_view.text == y_view.text
    await eventually(lambda: _streams_active_is(a, 0))

    async def saved(server: Server) -> list[tuple[str, str, bool]] | None:
        response = await request(server, "GET", f"/api/conversations/{conversation}", x.cookie)
        if response.status_code != 200:
            return None
        messages = response.json()["messages"]
        if not any(m["role"] == "assistant" for m in messages):
            return None
        return [(m["role"], m["text"], m["complete"]) for m in messages]

    for server in (a, b):  # the history is shared: either node answers the same
        messages = await eventually(lambda server=server: saved(server))
        assert messages == [("user", prompt, True), ("assistant", x_view.text, False)]
    for client in (x, y):
        await client.close()


# ---- 4. the generating node dies ------------------------------------------------------


async def test_readers_get_a_retryable_error_when_the_generating_node_dies(
    make_server: Callable[..., Server], redis_url: str
) -> None:
    # 100 tokens/s: the answer lasts about 2.5 s, far longer than the test needs to kill A.
    a = start_node(make_server, redis_url, "a", demo_tokens_per_second=100)
    b = start_node(make_server, redis_url, "b", demo_tokens_per_second=100)
    x = await connect_to(a)
    reader = await connect_to(b, x.cookie)
    prompt = "the node running me dies"
    stream, conversation = await begin_chat(x, prompt)  # A generates
    await reader.until(token_of(stream, 5))

    a.stop(signal.SIGKILL)
    view = await reader.until_end(stream, timeout=PRODUCER_LOST_DEADLINE)
    assert await x.drain_until_closed() in (None, 1006)  # its node is gone
    assert view.end is not None
    assert {k: view.end.get(k) for k in ("type", "id", "code", "retryable")} == {
        "type": "error",
        "id": stream,
        "code": "provider_error",
        "retryable": True,
    }
    full = demo_reply(prompt)
    assert full.startswith(view.text) and len(view.text) < len(full)
    assert (view.duplicates, view.gaps) == (0, 0)

    # The user retries: a new request id with the same text, on the surviving node.
    retry, _ = await begin_chat(reader, prompt, conversation)
    assert_complete(await reader.until_end(retry), prompt)
    assert (await metrics(b))["tokenwire_producers_lost_total"] == 1
    await eventually(lambda: _streams_active_is(b, 0))
    await reader.close()


# ---- 5. Redis restarts mid-stream -----------------------------------------------------


async def settle(client: Client, stream: str, view: StreamView) -> StreamView:
    """What a client following the protocol makes of a stream that ended: a gap it saw,
    or a `done` beyond its last token, makes it resume; the result is what it shows."""
    assert view.end is not None
    if view.end["type"] == "error":
        return view
    if view.gaps == 0 and view.end["seq"] == view.last:
        return view
    resumed = StreamView(text=view.text, last=view.last)
    await client.resume(stream, resumed)
    return await client.until_end(stream)


def assert_full_text_or_error(
    view: StreamView, prompt: str, codes: tuple[str, ...] = INCOMPLETE_ANSWER_CODES
) -> None:
    """Never a silent gap: the whole answer exactly once, or an error frame with one of
    `codes`; what was shown before an error is a true prefix of the answer."""
    full = demo_reply(prompt)
    assert view.end is not None
    assert full.startswith(view.text)
    assert view.duplicates == 0
    if view.end["type"] == "error":
        assert view.end["code"] in codes, view.end
    else:
        assert view.text == full, f"a silent gap: {len(view.text)} of {len(full)} characters"
        assert view.end["seq"] == view.last == len(demo_tokens(prompt))


# Redis goes away mid-stream on purpose: the generation fails and its end cannot be
# recorded, each logged with the traceback of a lost Redis connection: redis-py's
# ConnectionError (refused, closed) or, read by backend/storage/redis_connection.py, the
# socket's reset.
@pytest.mark.server_log(
    r"(?m)^(redis\.exceptions\.ConnectionError: .+|ConnectionResetError: \[Errno 104\] .+)$"
)
async def test_redis_restart_mid_stream(
    make_server: Callable[..., Server], own_redis: RedisServer
) -> None:
    # 100 tokens/s: the answer lasts about 2.5 s, and Redis goes down at its 5th token.
    a = start_node(make_server, own_redis.url, "a", demo_tokens_per_second=100)
    b = start_node(make_server, own_redis.url, "b", demo_tokens_per_second=100)
    x = await connect_to(a)
    y = await connect_to(b, x.cookie)
    prompt = "stream through a redis restart"
    stream, _ = await begin_chat(x, prompt)  # A generates
    await asyncio.gather(x.until(token_of(stream, 5)), y.until(token_of(stream, 5)))

    async with reading(x, y) as readers:
        own_redis.stop()
        for node in (a, b):
            await eventually(lambda node=node: _ready_is(node, 503), REDIS_NOTICE_DEADLINE)
            assert "tokenwire_streams_active" in await metrics(node)
        await asyncio.to_thread(own_redis.start)  # the same port, empty
        for node in (a, b):
            await eventually(lambda node=node: _ready_is(node, 200), REDIS_NOTICE_DEADLINE)
        # Both followers see the stream end, one way or another.
        await wait_for(
            lambda: x.view(stream).end is not None and y.view(stream).end is not None,
            PRODUCER_LOST_DEADLINE,
        )
        closed = [task.result() for task in readers if task.done()]
        assert closed == [], "a node closed a WebSocket because Redis restarted"

    # After recovery, new chats work end to end from either node, on the same connections.
    for sender, text in ((x, "after the restart, from A"), (y, "after the restart, from B")):
        new_stream, _ = await begin_chat(sender, text)
        views = await asyncio.gather(*(c.until_end(new_stream) for c in (x, y)))
        for view in views:
            assert_complete(view, text)
    await eventually(lambda: _streams_active_is(a, 0))

    # What the followers were shown of the stream Redis lost: all of it, or an error that
    # says the answer is incomplete.
    for client in (x, y):
        assert_full_text_or_error(await settle(client, stream, client.view(stream)), prompt)

    # Another connection resumes from what the page showed: its log is gone with Redis's
    # data, so the answer is `stream_expired` (the page marks it incomplete, offers Retry).
    # (A resume from 0 of an id of which nothing is left cannot be told from an unknown id:
    # that one is `not_found`, which the page treats the same way.)
    late = await connect_to(b, x.cookie)
    shown = x.view(stream)
    await late.resume(stream, StreamView(text=shown.text, last=shown.last))
    replay = await late.until_end(stream)
    assert_full_text_or_error(replay, prompt, codes=("stream_expired",))
    assert replay.gaps == 0
    for client in (x, y, late):
        await client.close()


async def _ready_is(server: Server, status: int) -> bool:
    return await readyz(server) == status


# ---- 6. what the Redis hop costs (measured and printed, not asserted) -----------------


async def first_token_latencies(
    sender: Client, others: list[Client], count: int
) -> list[list[float]]:
    """For `count` chats in a row: seconds from sending `chat` on `sender` to the first
    token on `sender` and on each of `others`; one list per client."""
    clients = [sender, *others]
    samples: list[list[float]] = [[] for _ in clients]

    async def first_token(client: Client, stream: str) -> float:
        await client.until(token_of(stream))
        return time.perf_counter()

    for _ in range(count):
        stream = new_id()
        sent = time.perf_counter()
        await sender.send(type="chat", id=stream, conversation=new_id(), text="how fast?")
        arrived = await asyncio.gather(*(first_token(c, stream) for c in clients))
        for sample, at in zip(samples, arrived, strict=True):
            sample.append(at - sent)
        await asyncio.gather(*(c.until_end(stream) for c in clients))
    return samples


def summary(seconds: list[float]) -> tuple[float, float]:
    """(median, p99) in milliseconds."""
    ms = sorted(s * 1000 for s in seconds)
    return statistics.median(ms), statistics.quantiles(ms, n=100, method="inclusive")[98]


async def test_added_latency_of_the_redis_hop(
    make_server: Callable[..., Server],
    redis_url: str,
    record_property: Callable[[str, object], None],
) -> None:
    unpaced = {
        "demo_tokens_per_second": 0,
        "demo_first_token_delay": 0,
        "demo_paragraphs": 0,  # a one-line answer: small chats
        # 210 chats per user in a row: a benchmark, not a test of the per-user chat limit.
        "chat_rate": 1000,
        "chat_burst": 1000,
    }
    solo = make_server(secret=SECRET, node=node_name("solo"), **unpaced)
    r1 = start_node(make_server, redis_url, "r1", **unpaced)
    r2 = start_node(make_server, redis_url, "r2", **unpaced)

    alone = await connect_to(solo)
    x = await connect_to(r1)
    y = await connect_to(r2, x.cookie)
    async with asyncio.timeout(60):
        await first_token_latencies(alone, [], LATENCY_WARMUP)
        await first_token_latencies(x, [y], LATENCY_WARMUP)
        (memory,) = await first_token_latencies(alone, [], LATENCY_CHATS)
        same_node, other_node = await first_token_latencies(x, [y], LATENCY_CHATS)

    rows = [
        ("single node, no Redis", "memory", memory),
        ("Redis, same node", "redis_same_node", same_node),
        ("Redis, other node", "redis_other_node", other_node),
    ]
    print(f"\n`chat` sent -> first `token` received, {LATENCY_CHATS} chats each (ms)")
    print(f"{'':<24}{'median':>8}{'p99':>8}")
    for label, key, samples in rows:
        median, p99 = summary(samples)
        print(f"{label:<24}{median:>8.2f}{p99:>8.2f}")
        record_property(f"first_token_ms_{key}_median", round(median, 3))
        record_property(f"first_token_ms_{key}_p99", round(p99, 3))
    added = summary(same_node)[0] - summary(memory)[0]
    print(f"added by Redis (median, same node): {added:.2f} ms")
    record_property("first_token_ms_added_by_redis_median", round(added, 3))
    for client in (alone, x, y):
        await client.close()
