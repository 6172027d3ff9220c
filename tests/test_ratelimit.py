"""Rate limits: the token-bucket arithmetic, the `RateLimiter` contract over every backend
(a real redis-server for `redis`), and the limits as clients of a real server see them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from backend.ratelimit import (
    Bucket,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    bucket_key,
    retry_after_rounded,
    take_from_bucket,
)
from tests.harness import TIMEOUT, Client, Server, new_id, start_chat

# ---- the pure arithmetic -------------------------------------------------------------------

BUCKET_CASES: list[tuple[str, Bucket | None, float, float, float, float, Bucket | None, float]] = [
    # (case, bucket, now, rate, burst, cost, bucket after, retry_after)
    ("new-bucket-is-full", None, 5.0, 1.0, 3.0, 1.0, Bucket(2.0, 5.0), 0.0),
    ("empty-refused", Bucket(0.0, 5.0), 5.0, 2.0, 3.0, 1.0, Bucket(0.0, 5.0), 0.5),
    ("refills-with-time", Bucket(0.0, 5.0), 6.0, 2.0, 3.0, 1.0, Bucket(1.0, 6.0), 0.0),
    ("refill-capped-at-burst", Bucket(0.0, 0.0), 100.0, 1.0, 3.0, 1.0, Bucket(2.0, 100.0), 0.0),
    ("cost-above-what-is-left", Bucket(1.0, 0.0), 0.0, 4.0, 5.0, 3.0, Bucket(1.0, 0.0), 0.5),
    ("cost-fits", Bucket(3.0, 0.0), 0.0, 4.0, 5.0, 3.0, Bucket(0.0, 0.0), 0.0),
    ("clock-going-back-adds-nothing", Bucket(0.0, 5.0), 4.0, 1.0, 3.0, 1.0, Bucket(0.0, 5.0), 1.0),
]


@pytest.mark.parametrize(
    ("bucket", "now", "rate", "burst", "cost", "after", "retry_after"),
    [c[1:] for c in BUCKET_CASES],
    ids=[c[0] for c in BUCKET_CASES],
)
def test_take_from_bucket(
    bucket: Bucket | None,
    now: float,
    rate: float,
    burst: float,
    cost: float,
    after: Bucket | None,
    retry_after: float,
) -> None:
    assert take_from_bucket(bucket, now, rate, burst, cost) == (after, retry_after)


@pytest.mark.parametrize(
    ("seconds", "rounded"),
    [(0.01, 0.1), (0.1, 0.1), (0.3001, 0.4), (0.3, 0.3), (2.95, 3.0), (1e-9, 0.1)],
)
def test_retry_after_rounds_up_to_a_tenth(seconds: float, rounded: float) -> None:
    assert retry_after_rounded(seconds) == rounded


async def test_memory_limiter_is_bounded_and_forgets_full_buckets() -> None:
    now = [0.0]
    limiter = MemoryRateLimiter(max_buckets=2, clock=lambda: now[0])
    for key in ("a", "b", "c"):
        assert await limiter.take(key, rate=1.0, burst=2.0) == 0.0
    assert len(limiter) == 2
    now[0] = 10.0  # every bucket is full again
    assert await limiter.take("d", rate=1.0, burst=2.0) == 0.0
    assert len(limiter) == 1


# ---- the contract, over every backend ------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    store: RateLimiter
    if request.param == "memory":
        store = MemoryRateLimiter()
    else:
        store = RedisRateLimiter(request.getfixturevalue("redis_clean"))
    yield store
    await store.aclose()


async def test_burst_then_refused(limiter: RateLimiter) -> None:
    for _ in range(10):
        assert await limiter.take("k", rate=1.0, burst=10) == 0.0
    retry_after = await limiter.take("k", rate=1.0, burst=10)
    assert 0.5 < retry_after <= 1.0  # one token at one per second, minus the time spent


async def test_refills_over_time(limiter: RateLimiter) -> None:
    rate = 10.0  # a token every 0.1 s: the scenario's pace
    assert await limiter.take("k", rate=rate, burst=2) == 0.0
    assert await limiter.take("k", rate=rate, burst=2) == 0.0
    refused_at = time.monotonic()
    assert await limiter.take("k", rate=rate, burst=2) > 0
    deadline = refused_at + 5
    while (wait := await limiter.take("k", rate=rate, burst=2)) > 0:
        assert time.monotonic() < deadline, "the bucket never refilled"
        await asyncio.sleep(min(wait, 0.05))
    assert time.monotonic() - refused_at > 0.5 / rate  # it did wait (a bound, not a timing)


async def test_keys_are_independent(limiter: RateLimiter) -> None:
    assert await limiter.take("a", rate=0.01, burst=1) == 0.0
    assert await limiter.take("a", rate=0.01, burst=1) > 0
    assert await limiter.take("b", rate=0.01, burst=1) == 0.0


async def test_concurrent_takes_pass_exactly_the_burst(limiter: RateLimiter) -> None:
    waits = await asyncio.gather(*(limiter.take("k", rate=0.01, burst=10) for _ in range(50)))
    assert sum(1 for w in waits if w == 0.0) == 10
    assert all(w > 0 for w in waits if w != 0.0)


async def test_cost_above_one(limiter: RateLimiter) -> None:
    assert await limiter.take("k", rate=0.5, burst=5, cost=3) == 0.0
    retry_after = await limiter.take("k", rate=0.5, burst=5, cost=3)  # 2 left, 1 short
    assert 1.5 < retry_after <= 2.0
    assert await limiter.take("k", rate=0.5, burst=5, cost=2) == 0.0


@pytest.mark.parametrize(
    ("rate", "burst", "cost"),
    [(0.0, 1.0, 1.0), (1.0, 1.0, 2.0), (1.0, 1.0, 0.0)],
    ids=["no-refill", "cost-above-burst", "no-cost"],
)
async def test_impossible_limits_are_refused(
    limiter: RateLimiter, rate: float, burst: float, cost: float
) -> None:
    with pytest.raises(ValueError):
        await limiter.take("k", rate=rate, burst=burst, cost=cost)


async def test_redis_bucket_expires_when_full_again(redis_clean: str) -> None:
    limiter = RedisRateLimiter(redis_clean)
    raw = Redis.from_url(redis_clean)
    try:
        assert await limiter.take("k", rate=10.0, burst=5, cost=2) == 0.0
        assert 0 < await raw.pttl(bucket_key("k")) <= 200  # 2 tokens at 10 per second
    finally:
        await raw.aclose()
        await limiter.aclose()


# ---- a real server ---------------------------------------------------------------------------


async def test_websocket_chats_over_the_burst(make_server: Callable[..., Server]) -> None:
    server = make_server(chat_rate=0.2, chat_burst=2)
    client = await Client.connect(server)
    try:
        first, conversation = await start_chat(client, "one")
        await start_chat(client, "two")
        refused = new_id()
        await client.send(type="chat", id=refused, conversation=new_id(), text="three")
        error = await client.until(lambda f: f["type"] in ("ack", "error") and f["id"] == refused)
        assert error["type"] == "error" and error["code"] == "rate_limited"
        assert error["retryable"] is True and error["retry_after"] > 0
        # The connection carries on, and a replay of an earlier chat is free.
        await client.send(type="ping", t=7)
        assert await client.until(lambda f: f["type"] == "pong") == {"type": "pong", "t": 7}
        await client.send(type="chat", id=first, conversation=conversation, text="one")
        ack = await client.until(lambda f: f["type"] in ("ack", "error") and f["id"] == first)
        assert ack == {"type": "ack", "id": first, "conversation": conversation}
        assert (await client.until_end(first)).end["type"] == "done"  # type: ignore[index]
    finally:
        await client.close()


async def test_http_chats_over_the_burst(make_server: Callable[..., Server]) -> None:
    server = make_server(chat_rate=0.2, chat_burst=2)
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        for _ in range(2):
            body = {"id": new_id(), "conversation": new_id(), "text": "hi"}
            assert (await http.post("/api/chat", json=body)).status_code == 202
        response = await http.post(
            "/api/chat", json={"id": new_id(), "conversation": new_id(), "text": "hi"}
        )
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        error = response.json()
        assert error["code"] == "rate_limited" and error["retryable"] is True
        assert error["retry_after"] > 0


async def test_connections_per_user_are_capped(make_server: Callable[..., Server]) -> None:
    server = make_server(max_connections_per_user=2)
    first = await Client.connect(server)
    second = await Client.connect(server, cookie=first.cookie)
    try:
        with pytest.raises(InvalidStatus) as refused:
            await asyncio.wait_for(
                connect(server.ws_url, additional_headers={"Cookie": first.cookie}), TIMEOUT
            )
        assert refused.value.response.status_code == 403
        # The open connections are untouched: both still get the user's stream.
        stream, _ = await start_chat(first, "still streaming")
        for client in (first, second):
            assert (await client.until_end(stream)).end["type"] == "done"  # type: ignore[index]
    finally:
        await first.close()
        await second.close()


async def test_connect_rate_per_address(make_server: Callable[..., Server]) -> None:
    server = make_server(connect_rate=2.0, connect_burst=3)
    for _ in range(3):
        client = await Client.connect(server)
        await client.close()
    with pytest.raises(InvalidStatus) as refused:
        await asyncio.wait_for(connect(server.ws_url), TIMEOUT)
    assert refused.value.response.status_code == 403
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        response = await http.get(f"/api/streams/{new_id()}")
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["code"] == "rate_limited"
    # Allowed again once the bucket refills (a refused attempt takes nothing from it).
    deadline = time.monotonic() + 5
    while True:
        try:
            client = await Client.connect(server)
        except InvalidStatus:
            assert time.monotonic() < deadline, "connections never allowed again"
            await asyncio.sleep(0.2)
            continue
        await client.close()
        break
