"""The `StreamLog` contract, run against every backend (add one to `BACKENDS` to cover it).

The fixture gives a log and `advance(seconds)`, which moves that log's clock: a fake clock
for the memory backend, so expiry is tested without sleeping; for Redis, which keeps time
itself, see `FastForwardLog`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
import redis.asyncio

from backend.protocol import DoneFrame, StreamEnd, TokenFrame, error_frame
from backend.storage.broker import Broker, Event, MemoryBroker, user_channel
from backend.storage.broker.redis import RedisBroker
from backend.storage.streams import (
    MemoryStreamLog,
    StreamExpired,
    StreamFull,
    StreamLog,
    StreamSlice,
)
from backend.storage.streams.base import DEFAULT_READ_LIMIT
from backend.storage.streams.redis import RedisStreamLog, end_key, log_key

pytestmark = pytest.mark.timeout(30)

BACKENDS = ["memory", "redis"]
MAX_TOKENS = 1000  # every backend of the suite is built with this bound
TTL = 60.0
SHORT_TTL = 0.05  # a real ttl, for Redis to expire a stream during a test
EXPIRY_WAIT = 5.0  # at most this long for Redis to expire a stream past its ttl
POLL = 0.01

Advance = Callable[[float], Awaitable[None]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def wait_until_expired(log: StreamLog, key: str) -> None:
    """Poll until reading `key` raises `StreamExpired` (Redis expires keys on its own time)."""
    async with asyncio.timeout(EXPIRY_WAIT):
        while True:
            try:
                await log.read_after(key, 0)
            except StreamExpired:
                return
            await asyncio.sleep(POLL)


class FastForwardLog(StreamLog):
    """A Redis log under a fake clock, for the expiry tests shared with the memory backend.

    `finish` passes the test's ttl on to Redis and notes the stream's deadline on the fake
    clock. When `advance` moves that clock past a deadline, the stream is finished again
    with a real `SHORT_TTL`, and `advance` returns once Redis has expired it. So a stream
    is alive exactly while the fake clock is before its deadline, and the expiry the test
    then sees is Redis's own.
    """

    def __init__(self, log: RedisStreamLog) -> None:
        self.log = log
        self.now = 0.0
        self._deadlines: dict[str, tuple[float, StreamEnd]] = {}

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        for key, (deadline, end) in list(self._deadlines.items()):
            if deadline <= self.now:
                del self._deadlines[key]
                await self.log.finish(key, end, SHORT_TTL)
                await wait_until_expired(self.log, key)

    async def create(self, key: str) -> None:
        await self.log.create(key)
        self._deadlines.pop(key, None)  # a new stream, or a running one (no deadline)

    async def append(self, key: str, tokens: Sequence[str]) -> int:
        return await self.log.append(key, tokens)

    async def append_and_publish(
        self,
        key: str,
        tokens: Sequence[str],
        broker: Broker,
        channel: str,
        event: Callable[[int], Event],
    ) -> int:
        return await self.log.append_and_publish(key, tokens, broker, channel, event)

    async def finish(self, key: str, end: StreamEnd, ttl: float) -> None:
        await self.log.finish(key, end, ttl)
        self._deadlines[key] = (self.now + ttl, end)

    async def read_after(
        self, key: str, after: int, limit: int = DEFAULT_READ_LIMIT
    ) -> StreamSlice:
        return await self.log.read_after(key, after, limit)

    def __len__(self) -> int:
        return len(self.log)

    async def aclose(self) -> None:
        await self.log.aclose()


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
async def stream_log(request: pytest.FixtureRequest) -> AsyncIterator[tuple[StreamLog, Advance]]:
    log: StreamLog
    if request.param == "memory":
        clock = FakeClock()
        log = MemoryStreamLog(max_tokens=MAX_TOKENS, clock=clock)

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        yield log, advance
    elif request.param == "redis":
        log = FastForwardLog(RedisStreamLog(request.getfixturevalue("redis_clean"), MAX_TOKENS))
        yield log, log.advance
    else:
        raise NotImplementedError(request.param)
    await log.aclose()


@pytest.fixture
def log(stream_log: tuple[StreamLog, Advance]) -> StreamLog:
    return stream_log[0]


def done(seq: int) -> DoneFrame:
    return DoneFrame(id="r1", seq=seq, reason="stop")


FIVE = ["t1", "t2", "t3", "t4", "t5"]


async def test_append_numbers_tokens_from_one(log: StreamLog) -> None:
    await log.create("k")
    assert await log.append("k", ["a"]) == 1
    assert await log.append("k", ["b", "c"]) == 3
    assert await log.append("k", ["d"]) == 4
    assert await log.read_after("k", 0) == StreamSlice(
        tokens=["a", "b", "c", "d"], end=None, last_seq=4
    )


@pytest.mark.parametrize("finished", [False, True], ids=["running", "finished"])
@pytest.mark.parametrize(
    ("after", "limit", "tokens", "reaches_end"),
    [
        pytest.param(0, DEFAULT_READ_LIMIT, FIVE, True, id="all"),
        pytest.param(0, 2, ["t1", "t2"], False, id="first-two"),
        pytest.param(2, 2, ["t3", "t4"], False, id="middle"),
        pytest.param(3, 2, ["t4", "t5"], True, id="last-two"),
        pytest.param(4, 1, ["t5"], True, id="last-one"),
        pytest.param(1, 10, ["t2", "t3", "t4", "t5"], True, id="limit-beyond-end"),
        pytest.param(5, DEFAULT_READ_LIMIT, [], True, id="after-the-last"),
    ],
)
async def test_read_after(
    log: StreamLog, after: int, limit: int, tokens: list[str], reaches_end: bool, finished: bool
) -> None:
    await log.create("k")
    await log.append("k", FIVE)
    if finished:
        await log.finish("k", done(5), TTL)
    expected_end = done(5) if finished and reaches_end else None
    assert await log.read_after("k", after, limit) == StreamSlice(
        tokens=tokens, end=expected_end, last_seq=5
    )


async def test_read_after_beyond_the_end_of_a_running_stream_is_empty(log: StreamLog) -> None:
    await log.create("k")
    await log.append("k", FIVE)
    assert await log.read_after("k", 9) == StreamSlice(tokens=[], end=None, last_seq=5)


async def test_read_of_an_empty_stream(log: StreamLog) -> None:
    await log.create("k")
    assert await log.read_after("k", 0) == StreamSlice(tokens=[], end=None, last_seq=0)
    await log.finish("k", done(0), TTL)
    assert await log.read_after("k", 0) == StreamSlice(tokens=[], end=done(0), last_seq=0)


async def test_read_limit_defaults_to_the_read_limit(log: StreamLog) -> None:
    tokens = [f"t{seq}" for seq in range(1, DEFAULT_READ_LIMIT + 11)]
    await log.create("k")
    await log.append("k", tokens)
    await log.finish("k", done(len(tokens)), TTL)
    first = await log.read_after("k", 0)
    assert first == StreamSlice(tokens=tokens[:DEFAULT_READ_LIMIT], end=None, last_seq=len(tokens))
    rest = await log.read_after("k", DEFAULT_READ_LIMIT)
    assert rest == StreamSlice(
        tokens=tokens[DEFAULT_READ_LIMIT:], end=done(len(tokens)), last_seq=len(tokens)
    )


@pytest.mark.parametrize(
    "end",
    [
        pytest.param(done(2), id="done"),
        pytest.param(DoneFrame(id="r1", seq=2, reason="cancelled"), id="cancelled"),
        pytest.param(error_frame("provider_error", "the model failed", "r1"), id="error"),
    ],
)
async def test_append_after_finish_is_refused(log: StreamLog, end: StreamEnd) -> None:
    await log.create("k")
    await log.append("k", ["a", "b"])
    await log.finish("k", end, TTL)
    with pytest.raises(StreamExpired):
        await log.append("k", ["c"])
    assert await log.read_after("k", 0) == StreamSlice(tokens=["a", "b"], end=end, last_seq=2)


async def test_stream_full_appends_nothing(log: StreamLog) -> None:
    await log.create("k")
    assert await log.append("k", ["x"] * (MAX_TOKENS - 2)) == MAX_TOKENS - 2
    with pytest.raises(StreamFull):
        await log.append("k", ["a", "b", "c"])
    assert (await log.read_after("k", 0)).last_seq == MAX_TOKENS - 2
    assert await log.append("k", ["a", "b"]) == MAX_TOKENS  # exactly at the bound is fine
    with pytest.raises(StreamFull):
        await log.append("k", ["c"])
    piece = await log.read_after("k", MAX_TOKENS - 3)
    assert piece == StreamSlice(tokens=["x", "a", "b"], end=None, last_seq=MAX_TOKENS)


# ---- append_and_publish: every log with the broker a deployment pairs it with ----------

CHANNEL = user_channel("alice")
HEAR_TIMEOUT = 5.0


@pytest.fixture
async def paired_broker(
    request: pytest.FixtureRequest, stream_log: tuple[StreamLog, Advance]
) -> AsyncIterator[Broker]:
    """The broker a deployment runs with this log: in memory, or Redis on the same server."""
    broker: Broker
    if isinstance(stream_log[0], MemoryStreamLog):
        broker = MemoryBroker()
    else:
        broker = RedisBroker(request.getfixturevalue("redis_clean"))
    yield broker
    await broker.aclose()


def token_event(tokens: Sequence[str]) -> Callable[[int], Event]:
    return lambda seq: TokenFrame(id="k", seq=seq, data="".join(tokens), n=len(tokens))


class Heard:
    """Every event of CHANNEL from subscription on, in the order the subscriber got them."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._new = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._new.set()

    async def before(self, marker: Event, broker: Broker) -> list[Event]:
        """Publish `marker` and wait until it is heard: every event published before it has
        been heard too (publishes reach a subscriber in order). Returns those."""
        await broker.publish(CHANNEL, marker)
        async with asyncio.timeout(HEAR_TIMEOUT):
            while marker not in self.events:
                self._new.clear()
                await self._new.wait()
        return self.events[: self.events.index(marker)]


async def hear(broker: Broker) -> Heard:
    heard = Heard()
    await broker.subscribe(CHANNEL, heard)
    return heard


MARKER = TokenFrame(id="marker", seq=1, data="", n=1)


async def test_append_and_publish_announces_each_append_at_its_last_seq(
    log: StreamLog, paired_broker: Broker
) -> None:
    heard = await hear(paired_broker)
    await log.create("k")
    assert await log.append_and_publish("k", ["a"], paired_broker, CHANNEL, token_event(["a"])) == 1
    seq = await log.append_and_publish(
        "k", ["b", "c"], paired_broker, CHANNEL, token_event(["b", "c"])
    )
    assert seq == 3
    assert await heard.before(MARKER, paired_broker) == [
        TokenFrame(id="k", seq=1, data="a", n=1),
        TokenFrame(id="k", seq=3, data="bc", n=2),
    ]
    assert await log.read_after("k", 0) == StreamSlice(tokens=["a", "b", "c"], end=None, last_seq=3)


async def test_append_and_publish_announces_nothing_the_log_refused(
    log: StreamLog, paired_broker: Broker
) -> None:
    heard = await hear(paired_broker)
    await log.create("k")
    await log.append("k", ["x"] * (MAX_TOKENS - 1))
    with pytest.raises(StreamFull):
        await log.append_and_publish(
            "k", ["a", "b"], paired_broker, CHANNEL, token_event(["a", "b"])
        )
    await log.finish("k", done(MAX_TOKENS - 1), TTL)
    with pytest.raises(StreamExpired):
        await log.append_and_publish("k", ["a"], paired_broker, CHANNEL, token_event(["a"]))
    with pytest.raises(StreamExpired):
        await log.append_and_publish("never", ["a"], paired_broker, CHANNEL, token_event(["a"]))
    assert await heard.before(MARKER, paired_broker) == []
    assert (await log.read_after("k", 0)).last_seq == MAX_TOKENS - 1


async def test_unknown_key_is_expired(log: StreamLog) -> None:
    with pytest.raises(StreamExpired):
        await log.read_after("never", 0)
    with pytest.raises(StreamExpired):
        await log.append("never", ["a"])


async def test_keys_are_separate(log: StreamLog) -> None:
    await log.create("alice:r1")
    await log.create("bob:r1")
    await log.append("alice:r1", ["a"])
    await log.append("bob:r1", ["b", "c"])
    await log.finish("bob:r1", done(2), TTL)
    assert await log.read_after("alice:r1", 0) == StreamSlice(tokens=["a"], end=None, last_seq=1)
    assert await log.read_after("bob:r1", 0) == StreamSlice(
        tokens=["b", "c"], end=done(2), last_seq=2
    )


async def test_finished_stream_expires_after_ttl(stream_log: tuple[StreamLog, Advance]) -> None:
    log, advance = stream_log
    await log.create("k")
    await log.append("k", ["a"])
    await log.finish("k", done(1), TTL)
    await advance(TTL - 1)
    assert await log.read_after("k", 0) == StreamSlice(tokens=["a"], end=done(1), last_seq=1)
    await advance(2)
    with pytest.raises(StreamExpired):
        await log.read_after("k", 0)
    with pytest.raises(StreamExpired):
        await log.append("k", ["b"])


async def test_running_stream_does_not_expire(stream_log: tuple[StreamLog, Advance]) -> None:
    log, advance = stream_log
    await log.create("k")
    await log.append("k", ["a"])
    await advance(100 * TTL)
    assert await log.append("k", ["b"]) == 2
    assert await log.read_after("k", 0) == StreamSlice(tokens=["a", "b"], end=None, last_seq=2)


async def test_expired_key_can_be_created_again(stream_log: tuple[StreamLog, Advance]) -> None:
    log, advance = stream_log
    await log.create("k")
    await log.append("k", ["a"])
    await log.finish("k", done(1), TTL)
    await advance(TTL + 1)
    await log.create("k")
    assert await log.read_after("k", 0) == StreamSlice(tokens=[], end=None, last_seq=0)
    assert await log.append("k", ["b"]) == 1


async def test_len_counts_streams_and_drops_expired_ones(
    stream_log: tuple[StreamLog, Advance],
) -> None:
    log, advance = stream_log
    assert len(log) == 0
    await log.create("a")
    await log.create("b")
    await log.create("a")
    assert len(log) == 2
    await log.finish("a", done(0), TTL)
    assert len(log) == 2  # finished streams are held until they expire
    await advance(TTL / 2)
    await log.finish("b", done(0), TTL)
    await advance(TTL / 2 + 1)  # "a" has expired, "b" has not
    await log.create("c")
    assert len(log) == 2
    await advance(TTL)
    await log.create("d")
    assert len(log) == 2  # "c" and "d" run; "b" has gone


async def test_create_on_a_running_stream_keeps_it(log: StreamLog) -> None:
    await log.create("k")
    await log.append("k", ["a", "b"])
    await log.create("k")
    assert await log.read_after("k", 0) == StreamSlice(tokens=["a", "b"], end=None, last_seq=2)
    assert await log.append("k", ["c"]) == 3


# ---- Redis only: what the shared suite cannot see ---------------------------------------


@pytest.fixture
async def redis_log(redis_clean: str) -> AsyncIterator[RedisStreamLog]:
    log = RedisStreamLog(redis_clean, MAX_TOKENS)
    yield log
    await log.aclose()


@pytest.fixture
async def inspector(redis_clean: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client, to look at the keys as Redis holds them."""
    client = redis.asyncio.Redis.from_url(redis_clean)
    yield client
    await client.aclose()


async def test_redis_finished_stream_expires_on_its_own(
    redis_log: RedisStreamLog, inspector: redis.asyncio.Redis
) -> None:
    await redis_log.create("k")
    await redis_log.append("k", ["a"])
    # A running stream carries the safety expiry, so a crashed producer leaks nothing.
    assert 0 < await inspector.pttl(log_key("k")) <= 24 * 3600 * 1000
    await redis_log.finish("k", done(1), 0.3)
    assert await redis_log.read_after("k", 0) == StreamSlice(tokens=["a"], end=done(1), last_seq=1)
    for key in (log_key("k"), end_key("k")):
        assert 0 < await inspector.pttl(key) <= 300
    await wait_until_expired(redis_log, "k")
    assert await inspector.exists(log_key("k"), end_key("k")) == 0
    assert len(redis_log) == 0


async def test_redis_append_is_fenced_against_a_recreated_stream(
    redis_clean: str, inspector: redis.asyncio.Redis
) -> None:
    first, second = RedisStreamLog(redis_clean, MAX_TOKENS), RedisStreamLog(redis_clean, MAX_TOKENS)
    try:
        await first.create("k")
        assert await first.append("k", ["a1"]) == 1
        # Redis loses its data (a restart without persistence) and another node starts the
        # same request again: the first producer must not write into the new stream.
        await inspector.flushall()
        await second.create("k")
        assert await second.append("k", ["b1"]) == 1
        with pytest.raises(StreamExpired):
            await first.append("k", ["a2"])
        with pytest.raises(StreamExpired):
            await first.finish("k", done(2), TTL)
        assert await second.read_after("k", 0) == StreamSlice(tokens=["b1"], end=None, last_seq=1)
    finally:
        await first.aclose()
        await second.aclose()


async def test_redis_append_refuses_an_unexpected_seq(redis_clean: str) -> None:
    owner, other = RedisStreamLog(redis_clean, MAX_TOKENS), RedisStreamLog(redis_clean, MAX_TOKENS)
    try:
        await owner.create("k")
        assert await owner.append("k", ["a", "b"]) == 2
        # Another writer (here one that never created the stream, so it appends unfenced)
        # moved the stream on: the owner's next append would not be seq 3, so it is refused.
        assert await other.append("k", ["x"]) == 3
        with pytest.raises(StreamExpired):
            await owner.append("k", ["c"])
        assert await owner.read_after("k", 0) == StreamSlice(
            tokens=["a", "b", "x"], end=None, last_seq=3
        )
    finally:
        await owner.aclose()
        await other.aclose()


async def test_redis_concurrent_appends_keep_seqs_without_holes(redis_log: RedisStreamLog) -> None:
    keys = [f"k{n}" for n in range(50)]
    for key in keys:
        await redis_log.create(key)

    async def produce(key: str) -> list[int]:
        return [await redis_log.append(key, [f"{key}-{i}", "+"]) for i in range(10)]

    async with asyncio.timeout(10):
        seqs = await asyncio.gather(*(produce(key) for key in keys))
    assert seqs == [list(range(2, 21, 2))] * len(keys)
    for key in keys:
        piece = await redis_log.read_after(key, 0)
        assert piece.last_seq == 20
        assert piece.tokens[::2] == [f"{key}-{i}" for i in range(10)]


def test_redis_url_is_checked() -> None:
    with pytest.raises(ValueError, match=r"TOKENWIRE_REDIS_URL must start with redis://"):
        RedisStreamLog("127.0.0.1:6379", MAX_TOKENS)


async def test_redis_append_and_publish_is_one_round_trip_with_a_redis_broker(
    redis_log: RedisStreamLog, redis_clean: str
) -> None:
    """The stream's creator knows its next seq, so the append's own script publishes."""
    broker = RedisBroker(redis_clean)
    try:
        heard = await hear(broker)
        await redis_log.create("k")
        for n in range(1, 6):
            seq = await redis_log.append_and_publish(
                "k", [f"t{n}"], broker, CHANNEL, token_event([f"t{n}"])
            )
            assert seq == n
        assert broker._publisher.batches == 0  # nothing went through the broker's publisher
        assert await heard.before(MARKER, broker) == [
            TokenFrame(id="k", seq=n, data=f"t{n}", n=1) for n in range(1, 6)
        ]
    finally:
        await broker.aclose()


@pytest.mark.parametrize("broker_kind", ["redis", "memory"])
async def test_redis_append_and_publish_without_the_fence_appends_then_publishes(
    redis_log: RedisStreamLog, redis_clean: str, broker_kind: str
) -> None:
    """A writer that did not create the stream cannot know its next seq before the append,
    and a broker elsewhere cannot be reached from the script: both publish after it."""
    broker: Broker = RedisBroker(redis_clean) if broker_kind == "redis" else MemoryBroker()
    other = RedisStreamLog(redis_clean, MAX_TOKENS)
    try:
        heard = await hear(broker)
        await redis_log.create("k")
        await redis_log.append("k", ["a", "b"])
        assert await other.append_and_publish("k", ["c"], broker, CHANNEL, token_event(["c"])) == 3
        assert await heard.before(MARKER, broker) == [TokenFrame(id="k", seq=3, data="c", n=1)]
    finally:
        await other.aclose()
        await broker.aclose()
