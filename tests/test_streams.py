"""The `StreamLog` contract, run against every backend (add one to `BACKENDS` to cover it).

The fixture gives a log and `advance(seconds)`, which moves that log's clock: a fake clock
for the memory backend, so expiry is tested without sleeping.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from backend.protocol import DoneFrame, StreamEnd, error_frame
from backend.streams import MemoryStreamLog, StreamExpired, StreamFull, StreamLog, StreamSlice
from backend.streams.base import DEFAULT_READ_LIMIT

pytestmark = pytest.mark.timeout(30)

BACKENDS = ["memory"]
MAX_TOKENS = 1000  # every backend of the suite is built with this bound
TTL = 60.0

Advance = Callable[[float], None]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
async def stream_log(request: pytest.FixtureRequest) -> AsyncIterator[tuple[StreamLog, Advance]]:
    if request.param == "memory":
        clock = FakeClock()
        log: StreamLog = MemoryStreamLog(max_tokens=MAX_TOKENS, clock=clock)
        advance = clock.advance
    else:
        raise NotImplementedError(request.param)
    yield log, advance
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
    advance(TTL - 1)
    assert await log.read_after("k", 0) == StreamSlice(tokens=["a"], end=done(1), last_seq=1)
    advance(2)
    with pytest.raises(StreamExpired):
        await log.read_after("k", 0)
    with pytest.raises(StreamExpired):
        await log.append("k", ["b"])


async def test_running_stream_does_not_expire(stream_log: tuple[StreamLog, Advance]) -> None:
    log, advance = stream_log
    await log.create("k")
    await log.append("k", ["a"])
    advance(100 * TTL)
    assert await log.append("k", ["b"]) == 2
    assert await log.read_after("k", 0) == StreamSlice(tokens=["a", "b"], end=None, last_seq=2)


async def test_expired_key_can_be_created_again(stream_log: tuple[StreamLog, Advance]) -> None:
    log, advance = stream_log
    await log.create("k")
    await log.append("k", ["a"])
    await log.finish("k", done(1), TTL)
    advance(TTL + 1)
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
    advance(TTL / 2)
    await log.finish("b", done(0), TTL)
    advance(TTL / 2 + 1)  # "a" has expired, "b" has not
    await log.create("c")
    assert len(log) == 2
    advance(TTL)
    await log.create("d")
    assert len(log) == 2  # "c" and "d" run; "b" has gone


async def test_create_on_a_running_stream_keeps_it(log: StreamLog) -> None:
    await log.create("k")
    await log.append("k", ["a", "b"])
    await log.create("k")
    assert await log.read_after("k", 0) == StreamSlice(tokens=["a", "b"], end=None, last_seq=2)
    assert await log.append("k", ["c"]) == 3
