"""The `Broker` contract, run against every backend (add one to `BACKENDS` to cover it),
then what only the Redis broker has: one Redis subscription per channel per node, several
nodes, a bounded publishing pool, and reconnection after a Redis restart.

Redis delivers asynchronously, so a test waits for what it expects by polling with a
deadline (`eventually`); to show that something did NOT arrive, it publishes a marker
after it and waits for the marker (Redis keeps the order of awaited publishes).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio

from backend.protocol import DoneFrame, MessageFrame, TokenFrame, error_frame
from backend.storage.broker import (
    Broker,
    Event,
    MemoryBroker,
    StreamEnded,
    Subscription,
    UserMessage,
    user_channel,
)
from backend.storage.broker.redis import RedisBroker
from harness.redis_server import RedisServer

pytestmark = pytest.mark.timeout(30)

BACKENDS = ["memory", "redis"]
TIMEOUT = 5.0
POLL = 0.005

ALICE, BOB = user_channel("alice"), user_channel("bob")


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    b: Broker
    if request.param == "memory":
        b = MemoryBroker()
    elif request.param == "redis":
        b = RedisBroker(request.getfixturevalue("redis_clean"))
    else:
        raise NotImplementedError(request.param)
    yield b
    async with asyncio.timeout(TIMEOUT):
        await b.aclose()


async def eventually(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Wait until `condition()` holds; fail after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(POLL)


async def aeventually(check: Callable[[], Awaitable[bool]], timeout: float = TIMEOUT) -> None:
    """Wait until `await check()` holds; fail after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(POLL)


class Inbox:
    """A listener that keeps what it receives."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    async def wait_for(self, count: int) -> list[Event]:
        await eventually(lambda: len(self.events) >= count)
        return self.events


async def subscribe(broker: Broker, channel: str) -> tuple[Inbox, Subscription]:
    inbox = Inbox()
    async with asyncio.timeout(TIMEOUT):
        subscription = await broker.subscribe(channel, inbox)
    return inbox, subscription


async def publish(broker: Broker, channel: str, event: Event) -> None:
    async with asyncio.timeout(TIMEOUT):
        await broker.publish(channel, event)


def token(stream: str, seq: int) -> TokenFrame:
    return TokenFrame(id=stream, seq=seq, data=f"{stream}-{seq}")


MARKER = TokenFrame(id="marker", seq=1, data="")

EVENTS: list[Event] = [
    token("r1", 1),
    TokenFrame(id="r1", seq=3, data="joined ü 家", n=2),
    StreamEnded(id="r1", seq=3, frame=DoneFrame(id="r1", seq=3, reason="stop")),
    StreamEnded(id="r2", seq=0, frame=error_frame("provider_error", "the model failed", "r2")),
    UserMessage(origin="conn-1", frame=MessageFrame(id="r3", conversation="c1", text="hi")),
]


# ---- the contract ----------------------------------------------------------------------


async def test_every_listener_of_the_channel_gets_every_event(broker: Broker) -> None:
    first, _ = await subscribe(broker, ALICE)
    second, _ = await subscribe(broker, ALICE)
    for event in EVENTS:
        await publish(broker, ALICE, event)
    assert await first.wait_for(len(EVENTS)) == EVENTS
    assert await second.wait_for(len(EVENTS)) == EVENTS


async def test_other_channels_get_nothing(broker: Broker) -> None:
    alice, _ = await subscribe(broker, ALICE)
    bob, _ = await subscribe(broker, BOB)
    await publish(broker, ALICE, token("r1", 1))
    await publish(broker, BOB, MARKER)
    assert await bob.wait_for(1) == [MARKER]
    assert await alice.wait_for(1) == [token("r1", 1)]


async def test_events_of_each_publisher_arrive_in_order(broker: Broker) -> None:
    inbox, _ = await subscribe(broker, ALICE)
    streams, count = [f"s{n}" for n in range(5)], 200

    async def produce(stream: str) -> None:
        for seq in range(1, count + 1):
            await broker.publish(ALICE, token(stream, seq))

    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(*(produce(stream) for stream in streams))
    events = await inbox.wait_for(len(streams) * count)
    for stream in streams:
        assert [e for e in events if isinstance(e, TokenFrame) and e.id == stream] == [
            token(stream, seq) for seq in range(1, count + 1)
        ]


async def test_a_closed_subscription_gets_nothing_more(broker: Broker) -> None:
    leaving, leaving_subscription = await subscribe(broker, ALICE)
    staying, _ = await subscribe(broker, ALICE)
    await publish(broker, ALICE, token("r1", 1))
    await leaving.wait_for(1)
    async with asyncio.timeout(TIMEOUT):
        await leaving_subscription.close()
        await leaving_subscription.close()  # idempotent
    await publish(broker, ALICE, token("r1", 2))
    await publish(broker, ALICE, MARKER)
    assert await staying.wait_for(3) == [token("r1", 1), token("r1", 2), MARKER]
    assert leaving.events == [token("r1", 1)]


async def test_an_event_in_flight_is_not_delivered_after_close(broker: Broker) -> None:
    inbox, subscription = await subscribe(broker, ALICE)
    witness, _ = await subscribe(broker, ALICE)
    # Published, but (for Redis) not read yet when the subscription closes.
    await publish(broker, ALICE, token("r1", 1))
    async with asyncio.timeout(TIMEOUT):
        await subscription.close()
    await publish(broker, ALICE, MARKER)
    await witness.wait_for(2)
    assert inbox.events in ([], [token("r1", 1)])  # memory delivers during publish


async def test_a_failing_listener_does_not_starve_the_others(broker: Broker) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    async with asyncio.timeout(TIMEOUT):
        await broker.subscribe(ALICE, broken)
    inbox, _ = await subscribe(broker, ALICE)
    await publish(broker, ALICE, token("r1", 1))
    await publish(broker, ALICE, token("r1", 2))
    assert await inbox.wait_for(2) == [token("r1", 1), token("r1", 2)]


async def test_subscriptions_counts_local_listeners(broker: Broker) -> None:
    assert broker.subscriptions() == 0
    _, a1 = await subscribe(broker, ALICE)
    _, a2 = await subscribe(broker, ALICE)
    _, b1 = await subscribe(broker, BOB)
    assert broker.subscriptions() == 3
    async with asyncio.timeout(TIMEOUT):
        await a1.close()
        assert broker.subscriptions() == 2
        await a1.close()
        assert broker.subscriptions() == 2
        await a2.close()
        await b1.close()
    assert broker.subscriptions() == 0


async def test_many_concurrent_publishers_are_all_delivered(broker: Broker) -> None:
    """1,000 generations publishing at once (the connection-pool trap of FIELD-NOTES.md)."""
    inbox, _ = await subscribe(broker, ALICE)
    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(*(broker.publish(ALICE, token(f"s{n}", 1)) for n in range(1000)))
    events = await inbox.wait_for(1000)
    assert sorted(e.id for e in events if isinstance(e, TokenFrame)) == sorted(
        f"s{n}" for n in range(1000)
    )


# ---- Redis only ------------------------------------------------------------------------


@pytest.fixture
async def inspector(redis_clean: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client, to see what Redis sees."""
    client = redis.asyncio.Redis.from_url(redis_clean)
    yield client
    async with asyncio.timeout(TIMEOUT):
        await client.aclose()


@pytest.fixture
async def make_node(redis_clean: str) -> AsyncIterator[Callable[..., RedisBroker]]:
    """Start Redis brokers ("nodes") of the test's own; all are closed at the end."""
    nodes: list[RedisBroker] = []

    def make(url: str = redis_clean, **options: Any) -> RedisBroker:
        node = RedisBroker(url, **options)
        nodes.append(node)
        return node

    yield make
    async with asyncio.timeout(TIMEOUT):
        for node in nodes:
            await node.aclose()


async def numsub(client: redis.asyncio.Redis, channel: str) -> int:
    """How many connections Redis counts as subscribed to `channel` (PUBSUB NUMSUB)."""
    async with asyncio.timeout(TIMEOUT):
        [(_, count)] = await client.pubsub_numsub(channel)
    return int(count)


async def numsub_is(client: redis.asyncio.Redis, channel: str, count: int) -> bool:
    return await numsub(client, channel) == count


async def test_redis_one_subscription_per_channel_per_node(
    make_node: Callable[..., RedisBroker], inspector: redis.asyncio.Redis
) -> None:
    node = make_node()
    _, first = await subscribe(node, ALICE)
    _, second = await subscribe(node, ALICE)
    assert await numsub(inspector, ALICE) == 1
    async with asyncio.timeout(TIMEOUT):
        await first.close()
    assert await numsub(inspector, ALICE) == 1  # one local listener is left
    async with asyncio.timeout(TIMEOUT):
        await second.close()
    await aeventually(lambda: numsub_is(inspector, ALICE, 0))
    # And back again when a listener returns.
    inbox, _ = await subscribe(node, ALICE)
    assert await numsub(inspector, ALICE) == 1
    await publish(node, ALICE, token("r1", 1))
    assert await inbox.wait_for(1) == [token("r1", 1)]


async def test_redis_a_publish_on_one_node_reaches_listeners_on_every_node(
    make_node: Callable[..., RedisBroker],
) -> None:
    gateway, producer = make_node(), make_node()
    on_gateway, _ = await subscribe(gateway, ALICE)
    on_producer, _ = await subscribe(producer, ALICE)
    for event in EVENTS:
        await publish(producer, ALICE, event)
    assert await on_gateway.wait_for(len(EVENTS)) == EVENTS
    assert await on_producer.wait_for(len(EVENTS)) == EVENTS


async def test_redis_publishers_wait_for_a_bounded_pool(
    make_node: Callable[..., RedisBroker], inspector: redis.asyncio.Redis
) -> None:
    """More concurrent publishers than connections: they queue for one, none is lost, and
    the node never holds more connections than its bound (+1 for its subscriber)."""
    node = make_node(max_connections=4)
    inbox, _ = await subscribe(node, ALICE)
    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(*(node.publish(ALICE, token(f"s{n}", 1)) for n in range(1000)))
    assert len(await inbox.wait_for(1000)) == 1000
    assert node.publish_failures == 0
    async with asyncio.timeout(TIMEOUT):
        clients = await inspector.client_list()
    assert len(clients) <= 4 + 1 + 1  # the pool, the subscriber, the inspector


async def test_redis_close_leaves_no_connection(
    make_node: Callable[..., RedisBroker], inspector: redis.asyncio.Redis
) -> None:
    node = make_node()
    await subscribe(node, ALICE)
    await publish(node, ALICE, token("r1", 1))
    async with asyncio.timeout(TIMEOUT):
        await node.aclose()
        await node.aclose()  # idempotent
    await aeventually(lambda: client_count_is(inspector, 1))  # the inspector alone
    assert await numsub(inspector, ALICE) == 0


async def client_count_is(client: redis.asyncio.Redis, count: int) -> bool:
    return len(await client.client_list()) == count


async def test_redis_broker_resubscribes_after_a_restart(
    own_redis: RedisServer, make_node: Callable[..., RedisBroker]
) -> None:
    node, other = make_node(own_redis.url), make_node(own_redis.url)
    inbox, _ = await subscribe(node, ALICE)
    bob, _ = await subscribe(node, BOB)
    await eventually(lambda: node.healthy)
    await publish(other, ALICE, token("r1", 1))
    await inbox.wait_for(1)

    await asyncio.to_thread(own_redis.stop)
    await eventually(lambda: not node.healthy)
    await publish(node, ALICE, token("r1", 2))  # lost (at most once), but never raises
    assert node.publish_failures == 1

    await asyncio.to_thread(own_redis.start)
    await eventually(lambda: node.healthy)
    # Healthy means every channel is subscribed again: publishes from any node arrive.
    await publish(other, ALICE, token("r1", 3))
    await publish(node, ALICE, token("r1", 4))
    await publish(node, BOB, MARKER)
    assert await inbox.wait_for(3) == [token("r1", 1), token("r1", 3), token("r1", 4)]
    assert await bob.wait_for(1) == [MARKER]
    assert node.subscriptions() == 2


async def test_redis_subscribe_while_redis_is_down_takes_effect_on_reconnect(
    own_redis: RedisServer, make_node: Callable[..., RedisBroker]
) -> None:
    node = make_node(own_redis.url)
    await node.open()
    await eventually(lambda: node.healthy)
    await asyncio.to_thread(own_redis.stop)
    await eventually(lambda: not node.healthy)
    inbox, _ = await subscribe(node, ALICE)  # returns at once: the outage is known
    await asyncio.to_thread(own_redis.start)
    await eventually(lambda: node.healthy)
    await publish(node, ALICE, token("r1", 1))
    assert await inbox.wait_for(1) == [token("r1", 1)]


@pytest.mark.parametrize("url", ["localhost:6379", "http://127.0.0.1:6379", ""])
def test_redis_url_is_checked(url: str) -> None:
    with pytest.raises(ValueError, match=r"TOKENWIRE_REDIS_URL must start with redis://"):
        RedisBroker(url)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:1/0", "rediss://user:pw@example.invalid:6380/1", "unix:///x.sock"]
)
async def test_redis_urls_of_every_scheme_are_accepted(url: str) -> None:
    node = RedisBroker(url)  # connects only when used
    async with asyncio.timeout(TIMEOUT):
        await node.aclose()


async def test_redis_a_silent_connection_is_replaced(
    own_redis: RedisServer, make_node: Callable[..., RedisBroker]
) -> None:
    """A peer that stops answering (here Redis paused) is found by the keepalive PING."""
    node = make_node(own_redis.url, keepalive=0.05)
    inbox, _ = await subscribe(node, ALICE)
    await eventually(lambda: node.healthy)
    client = redis.asyncio.Redis.from_url(own_redis.url)
    try:
        async with asyncio.timeout(TIMEOUT):
            await client.execute_command("CLIENT", "PAUSE", 500, "ALL")
        await eventually(lambda: not node.healthy)
        await eventually(lambda: node.healthy)
        await publish(node, ALICE, token("r1", 1))
        assert await inbox.wait_for(1) == [token("r1", 1)]
    finally:
        async with asyncio.timeout(TIMEOUT):
            await client.aclose()
