"""The chaos soak, short version: a few dozen streams kept going while a proxy cuts their
connections at random (FIN and RST, some in the middle of a frame); every stream's text must
be the provider's, exactly once, in order, and once every client has left the server must
hold what it held before (connections, broker subscriptions, generations, tasks).

The full soak (hundreds of streams for a minute, with memory figures) is
`python -m bench.soak`; the clients and their audit are in harness/chaos.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from backend.chat.service import ChatService
from backend.protocol import DoneFrame, TokenFrame
from backend.providers import DemoProvider, demo_reply
from backend.storage.broker import Event, MemoryBroker, StreamEnded, user_channel
from backend.storage.history import SqliteHistory
from backend.storage.leases import MemoryLeases
from backend.storage.ratelimit import MemoryRateLimiter
from backend.storage.request_ids import MemoryRequestRegistry
from backend.storage.streams import MemoryStreamLog, StreamLog
from e2e.proxy import TcpProxy
from harness.chaos import Tally, gauges, run_streams, warm_up
from harness.redis_server import RedisServer
from harness.server import TIMEOUT, Client, Server, new_id, wait_for
from tests.conftest import FAST_DEMO

# Many chats and reconnects from one address and identity: the abuse limits are not what is
# tested here (tests/contract/test_ratelimit.py is).
NO_LIMITS: Final[dict[str, Any]] = {
    "chat_rate": 100_000,
    "chat_burst": 100_000,
    "connect_rate": 100_000,
    "connect_burst": 100_000,
}
CLIENTS: Final = 8
STREAMS_PER_CLIENT: Final = 4
CHAOS_SECONDS: Final = 10.0
CUTS_PER_SECOND: Final = 8.0
PATIENCE: Final = 30.0  # the longest one chat may take to end, cuts included
BASELINE_DEADLINE: Final = 15.0
CHATS_WHILE_CONNECTING: Final = 100
LEASE: Final = 1.0
RENEW_DELAY: Final = 0.05
GENERATIONS: Final = 60  # x RENEW_DELAY: three leases, renewed one after another
SAME_CHAT_ATTEMPTS: Final = 30


async def soak(urls: list[str], proxies: list[TcpProxy], seed: int) -> Tally:
    """Chats on every client until the chaos is over, then until each has ended."""
    tally = Tally()
    for index, proxy in enumerate(proxies):
        proxy.start_chaos(CUTS_PER_SECOND / len(proxies), CHAOS_SECONDS, seed=seed + index)
    until = time.monotonic() + CHAOS_SECONDS
    try:
        await run_streams(
            urls,
            tally,
            clients=CLIENTS,
            streams_per_client=STREAMS_PER_CLIENT,
            more=lambda: time.monotonic() < until,
            seed=seed,
            patience=PATIENCE,
        )
    finally:
        for proxy in proxies:
            proxy.stop_chaos()
    return tally


async def back_to(servers: list[Server], baseline: list[dict[str, float]]) -> None:
    """Wait until every server's gauges are back at `baseline`; fail naming the ones not."""
    now: list[dict[str, float]] = []

    def settled() -> bool:
        now[:] = [gauges(server.metrics()) for server in servers]
        return now == baseline

    try:
        await wait_for(settled, BASELINE_DEADLINE)
    except AssertionError:
        raise AssertionError(f"gauges did not return to {baseline}: {now}") from None


def assert_exact(tally: Tally, cuts: int) -> None:
    problems = tally.problems()
    assert not problems, "\n".join(problems)
    assert tally.completed == tally.chats > CLIENTS * STREAMS_PER_CLIENT
    # The cuts happened and hit the clients: they reconnected and resumed.
    assert cuts > CHAOS_SECONDS * CUTS_PER_SECOND / 3
    assert tally.drops > 0 and tally.resumes > 0


async def test_every_stream_exact_under_random_cuts_and_the_server_back_to_baseline(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(**NO_LIMITS)
    await warm_up(server)
    baseline = [gauges(server.metrics())]
    assert {"tokenwire_connections", "tokenwire_subscriptions", "tokenwire_streams_active"} <= set(
        baseline[0]
    )
    with TcpProxy(server.port, max_connections=4 * CLIENTS) as proxy:
        tally = await soak([f"ws://127.0.0.1:{proxy.port}/ws"], [proxy], seed=1)
        cuts = proxy.cuts_made
    assert_exact(tally, cuts)
    await back_to([server], baseline)


async def test_two_nodes_through_redis_every_reconnect_on_the_other_node(
    make_server: Callable[..., Server], own_redis: RedisServer
) -> None:
    settings = {**NO_LIMITS, "redis_url": own_redis.url, "lease_seconds": 2}
    nodes = [make_server(node=f"soak-{label}-{new_id()[:6]}", **settings) for label in "ab"]
    for node in nodes:
        await warm_up(node)
    baseline = [gauges(node.metrics()) for node in nodes]
    with (
        TcpProxy(nodes[0].port, max_connections=4 * CLIENTS) as proxy_a,
        TcpProxy(nodes[1].port, max_connections=4 * CLIENTS) as proxy_b,
    ):
        urls = [f"ws://127.0.0.1:{p.port}/ws" for p in (proxy_a, proxy_b)]
        tally = await soak(urls, [proxy_a, proxy_b], seed=2)
        cuts = proxy_a.cuts_made + proxy_b.cuts_made
    assert_exact(tally, cuts)
    # Each client rotates over the two nodes with every attempt: a reconnect after a cut
    # lands on the other node, unless an attempt failed in between (cut during the upgrade).
    assert tally.cross_node >= tally.drops - tally.failed_connects > 0
    await back_to(nodes, baseline)


# ---- bugs the soak found -------------------------------------------------------------------


def chat_service(
    history: SqliteHistory,
    broker: MemoryBroker,
    leases: MemoryLeases,
    provider: DemoProvider,
    lease_ttl: float,
    log: StreamLog | None = None,
) -> ChatService:
    """A chat service in this process, on the memory backends and a real SQLite history."""
    return ChatService(
        log=MemoryStreamLog(max_tokens=10_000) if log is None else log,
        broker=broker,
        history=history,
        provider=provider,
        registry=MemoryRequestRegistry(),
        leases=leases,
        limiter=MemoryRateLimiter(),
        chat_rate=100_000.0,
        chat_burst=100_000.0,
        node="solo",
        stream_ttl=60.0,
        max_tokens=10_000,
        context_messages=0,
        lease_ttl=lease_ttl,
    )


async def answer(chat: ChatService, user: str, stream: str) -> str:
    """The stream's whole text once it ended with `done`."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        piece = await chat.read_after(user, stream, 0, 10_000)
        if piece.end is not None:
            assert isinstance(piece.end, DoneFrame), piece.end
            return "".join(piece.tokens)
        assert time.monotonic() < deadline, f"stream {stream} never ended"
        await asyncio.sleep(0.02)


async def test_a_chat_whose_client_left_while_it_was_accepted_still_answers(
    tmp_path: Path,
) -> None:
    """A connection cut while the server was accepting a chat cancels that connection's
    tasks. The acceptance must still finish (claim, log, history, generation): the client
    sends the same chat again on its next connection, and that repeat replays the stream;
    a claimed id without a generation left it waiting until the watch ended it as lost."""
    history = await SqliteHistory.open(str(tmp_path / "history.db"))
    entered, release = asyncio.Event(), asyncio.Event()
    add_user_message = history.add_user_message

    async def slow_disk(user: str, conversation: str, id: str, text: str) -> bool:
        entered.set()
        await release.wait()
        return await add_user_message(user, conversation, id, text)

    history.add_user_message = slow_disk  # type: ignore[method-assign]
    broker = MemoryBroker()
    chat = chat_service(
        history,
        broker,
        MemoryLeases(),
        DemoProvider(
            first_token_delay=FAST_DEMO["demo_first_token_delay"],
            tokens_per_second=FAST_DEMO["demo_tokens_per_second"],
        ),
        lease_ttl=10.0,
    )
    await chat.open()
    try:
        stream, conversation, prompt = new_id(), new_id(), "cut while accepted"
        first = asyncio.create_task(chat.start("u1", stream, conversation, prompt, origin="c1"))
        async with asyncio.timeout(TIMEOUT):
            await entered.wait()
        first.cancel()  # the connection's receive loop, cancelled by the cut
        await asyncio.gather(first, return_exceptions=True)
        release.set()
        again = await chat.start("u1", stream, conversation, prompt, origin="c2")
        assert again.conversation == conversation

        async with asyncio.timeout(TIMEOUT):
            assert await answer(chat, "u1", stream) == demo_reply(prompt)
    finally:
        await chat.aclose()
        await history.aclose()
        await broker.aclose()


class LostReplyLog(MemoryStreamLog):
    """Its `hang_at`-th append lands, and is announced, but the caller never hears back:
    what a Redis append looks like when its generation is cancelled while it is on the
    wire (the script runs, publishing the tokens, after the caller stopped waiting)."""

    def __init__(self, hang_at: int) -> None:
        super().__init__(max_tokens=10_000)
        self.hang_at = hang_at
        self.appends = 0
        self.hung = asyncio.Event()

    async def append_and_publish(self, *args: Any) -> int:
        seq = await super().append_and_publish(*args)
        self.appends += 1
        if self.appends == self.hang_at:
            self.hung.set()
            await asyncio.Event().wait()  # the reply that never comes
        return seq


async def test_a_cancel_while_an_append_is_on_the_wire_ends_after_its_tokens(
    tmp_path: Path,
) -> None:
    """Found by test_multinode (1 run in 4): a cancel landed while the append's script was
    on the wire. The tokens went out, but the generation still knew the seq before them,
    so readers got `done` with a seq lower than the last token they had."""
    history = await SqliteHistory.open(str(tmp_path / "history.db"))
    broker = MemoryBroker()
    log = LostReplyLog(hang_at=5)
    provider = DemoProvider(
        first_token_delay=FAST_DEMO["demo_first_token_delay"],
        tokens_per_second=FAST_DEMO["demo_tokens_per_second"],
    )
    chat = chat_service(history, broker, MemoryLeases(), provider, lease_ttl=10.0, log=log)
    heard: list[Event] = []
    ended = asyncio.Event()

    def listener(event: Event) -> None:
        heard.append(event)
        if isinstance(event, StreamEnded):
            ended.set()

    await broker.subscribe(user_channel("u1"), listener)
    await chat.open()
    try:
        stream, conversation = new_id(), new_id()
        await chat.start("u1", stream, conversation, "cut me off", origin="c1")
        async with asyncio.timeout(TIMEOUT):
            await log.hung.wait()
            await chat.cancel("u1", stream)
            await ended.wait()
        tokens = [e for e in heard if isinstance(e, TokenFrame)]
        end = next(e for e in heard if isinstance(e, StreamEnded))
        last = (await log.read_after(f"u1:{stream}", 0)).last_seq
        assert tokens[-1].seq == last == end.seq
        assert end.frame == DoneFrame(id=stream, seq=last, reason="cancelled")
        messages = await history.messages("u1", conversation)
        assert messages is not None
        assert messages[-1].text == "".join(t.data for t in tokens)
    finally:
        await chat.aclose()
        await history.aclose()
        await broker.aclose()


async def test_hello_is_the_first_frame_while_the_user_starts_chats(
    make_server: Callable[..., Server], own_redis: RedisServer
) -> None:
    """A connection subscribes to its user's channel as it opens; with Redis that takes a
    round trip, during which chats the user starts on another node send their `message`
    and first token. Those must queue behind `hello`, the first frame of every connection."""
    settings = {"redis_url": own_redis.url, "demo_paragraphs": 0, **NO_LIMITS}
    busy_node, other_node = (
        make_server(node=f"hello-{c}-{new_id()[:6]}", **settings) for c in "ab"
    )
    # It never reads: its close handshake would wait behind everything queued for it.
    busy = await Client.connect(busy_node, close_timeout=0.5)

    async def keep_starting_chats() -> None:
        for i in range(CHATS_WHILE_CONNECTING):
            await busy.send(type="chat", id=new_id(), conversation=new_id(), text=f"busy {i}")
            await asyncio.sleep(0.002)

    chats = asyncio.create_task(keep_starting_chats())
    try:
        while not chats.done():
            # The user's only connection on this node: each one subscribes on Redis anew.
            late = await Client.connect(other_node, cookie=busy.cookie)  # asserts hello first
            await late.close()
        await chats
    finally:
        chats.cancel()
        await busy.close()


async def test_the_same_chat_sent_to_two_nodes_at_once_is_answered_on_both(
    make_server: Callable[..., Server], own_redis: RedisServer
) -> None:
    """A client whose connection was cut before the ack sends its chat again on the other
    node, maybe while the first node is still accepting it. Whichever node claims the id
    first, the other replays the stream: both connections get the whole answer, never
    `stream_expired` for a log the first node had not created yet."""
    nodes = [
        make_server(
            redis_url=own_redis.url,
            node=f"twice-{c}-{new_id()[:6]}",
            demo_paragraphs=0,
            **NO_LIMITS,
        )
        for c in "ab"
    ]
    first = await Client.connect(nodes[0])
    second = await Client.connect(nodes[1], cookie=first.cookie)
    try:
        for attempt in range(SAME_CHAT_ATTEMPTS):
            stream, conversation, prompt = new_id(), new_id(), f"twice {attempt}"
            frame = json.dumps(
                {"type": "chat", "id": stream, "conversation": conversation, "text": prompt}
            )
            await asyncio.gather(first.ws.send(frame), second.ws.send(frame))
            for client in (first, second):
                view = await client.until_end(stream)
                assert view.end is not None and view.end["type"] == "done", view.end
                assert view.text == demo_reply(prompt, paragraphs=0)
    finally:
        await first.close()
        await second.close()


class SlowLeases(MemoryLeases):
    """Leases on a storage that takes `RENEW_DELAY` per renewal, as a loaded Redis does."""

    async def renew(self, key: str, node: str, ttl: float) -> bool:
        await asyncio.sleep(RENEW_DELAY)
        return await super().renew(key, node, ttl)


async def test_a_node_with_many_generations_renews_every_lease_in_time(tmp_path: Path) -> None:
    """Under the two-node soak, a node with ~150 generations lost leases mid-stream: it
    renewed them one round trip after another, which took longer than a lease, and each
    lapsed lease stopped its answer with `provider_error`. Renewals must not add up."""
    history = await SqliteHistory.open(str(tmp_path / "history.db"))
    broker = MemoryBroker()
    # Each answer lasts about two leases; one renewal after another would take ~3 leases.
    chat = chat_service(
        history,
        broker,
        SlowLeases(),
        DemoProvider(first_token_delay=0, tokens_per_second=50, paragraphs=1),
        lease_ttl=LEASE,
    )
    await chat.open()
    try:
        prompts = {new_id(): f"renew me {i}" for i in range(GENERATIONS)}
        for stream, prompt in prompts.items():
            await chat.start("u1", stream, new_id(), prompt, origin="c1")
        async with asyncio.timeout(TIMEOUT):
            for stream, prompt in prompts.items():
                assert await answer(chat, "u1", stream) == demo_reply(prompt, paragraphs=1)
    finally:
        await chat.aclose()
        await history.aclose()
        await broker.aclose()
