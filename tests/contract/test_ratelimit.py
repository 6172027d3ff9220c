"""Rate limits and the token quota: the token-bucket arithmetic, the `RateLimiter` contract
over every backend (a real redis-server for `redis`), and the limits as clients of a real
server see them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from backend.protocol import ProtocolError
from backend.providers import demo_tokens
from backend.runtime import Runtime
from backend.settings import Settings
from backend.storage.ratelimit import (
    Bucket,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    TokenQuota,
    bucket_key,
    quota_key,
    retry_after_rounded,
    spend_from_bucket,
    take_from_bucket,
)
from harness.server import TIMEOUT, Client, Server, new_id, start_chat

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


SPEND_CASES: list[
    tuple[str, Bucket | None, float, float, float, float | None, float, Bucket | None, float]
] = [
    # (case, bucket, now, rate, burst, need, cost, bucket after, retry_after)
    ("check-new-bucket-takes-nothing", None, 5.0, 1.0, 10.0, 1.0, 0.0, None, 0.0),
    ("check-passes-unchanged", Bucket(3.0, 5.0), 6.0, 1.0, 10.0, 1.0, 0.0, Bucket(3.0, 5.0), 0.0),
    ("check-in-debt-waits", Bucket(-4.0, 5.0), 5.0, 2.0, 10.0, 1.0, 0.0, Bucket(-4.0, 5.0), 2.5),
    ("debt-paid-back", Bucket(-4.0, 5.0), 8.0, 2.0, 10.0, 1.0, 0.0, Bucket(-4.0, 5.0), 0.0),
    ("charge-below-zero", Bucket(3.0, 5.0), 5.0, 1.0, 10.0, None, 8.0, Bucket(-5.0, 5.0), 0.0),
    ("charge-refills-first", Bucket(0.0, 0.0), 4.0, 1.0, 10.0, None, 6.0, Bucket(-2.0, 4.0), 0.0),
    ("charge-new-bucket", None, 1.0, 1.0, 10.0, None, 25.0, Bucket(-15.0, 1.0), 0.0),
    ("charge-in-debt-deepens", Bucket(-5.0, 1.0), 1.0, 1.0, 9.0, None, 2.0, Bucket(-7.0, 1.0), 0.0),
    ("need-above-cost", Bucket(2.0, 0.0), 0.0, 1.0, 9.0, 3.0, 1.0, Bucket(2.0, 0.0), 1.0),
]


@pytest.mark.parametrize(
    ("bucket", "now", "rate", "burst", "need", "cost", "after", "retry_after"),
    [c[1:] for c in SPEND_CASES],
    ids=[c[0] for c in SPEND_CASES],
)
def test_spend_from_bucket(
    bucket: Bucket | None,
    now: float,
    rate: float,
    burst: float,
    need: float | None,
    cost: float,
    after: Bucket | None,
    retry_after: float,
) -> None:
    assert spend_from_bucket(bucket, now, rate, burst, need, cost) == (after, retry_after)


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


async def test_a_spend_of_nothing_checks_without_taking(limiter: RateLimiter) -> None:
    for _ in range(20):
        assert await limiter.spend("k", rate=0.01, burst=5, need=1, cost=0) == 0.0
    for _ in range(5):  # the whole burst is still there
        assert await limiter.take("k", rate=0.01, burst=5) == 0.0
    retry_after = await limiter.spend("k", rate=0.01, burst=5, need=1, cost=0)
    assert 99 < retry_after <= 100


async def test_an_unconditional_spend_goes_below_zero(limiter: RateLimiter) -> None:
    assert await limiter.spend("k", rate=1.0, burst=10, need=None, cost=25) == 0.0
    # 10 - 25 = -15: one token is 16 seconds away (less the time spent since).
    retry_after = await limiter.spend("k", rate=1.0, burst=10, need=1, cost=0)
    assert 15.5 < retry_after <= 16.0
    assert await limiter.take("k", rate=1.0, burst=10) > 15.5


async def test_concurrent_unconditional_spends_all_count(limiter: RateLimiter) -> None:
    waits = await asyncio.gather(
        *(limiter.spend("k", rate=0.01, burst=10, need=None, cost=1) for _ in range(50))
    )
    assert waits == [0.0] * 50
    retry_after = await limiter.spend("k", rate=0.01, burst=10, need=1, cost=0)
    assert 4099 < retry_after <= 4100  # 10 - 50 = -40: 41 tokens at 0.01 per second


async def test_a_debt_is_paid_back_over_time(limiter: RateLimiter) -> None:
    rate = 10.0
    assert await limiter.spend("k", rate=rate, burst=2, need=None, cost=4) == 0.0  # at -2
    charged_at = time.monotonic()
    deadline = charged_at + 5
    while (wait := await limiter.spend("k", rate=rate, burst=2, need=1, cost=0)) > 0:
        assert time.monotonic() < deadline, "the debt was never paid back"
        await asyncio.sleep(min(wait, 0.05))
    assert time.monotonic() - charged_at > 2 / rate  # it did wait (a bound, not a timing)


@pytest.mark.parametrize(
    ("rate", "burst", "need", "cost"),
    [
        (0.0, 1.0, 1.0, 0.0),
        (1.0, 0.0, None, 1.0),
        (1.0, 1.0, 2.0, 0.0),
        (1.0, 1.0, 0.0, 0.0),
        (1.0, 1.0, None, -1.0),
    ],
    ids=["no-refill", "no-burst", "need-above-burst", "need-nothing", "negative-cost"],
)
async def test_impossible_spends_are_refused(
    limiter: RateLimiter, rate: float, burst: float, need: float | None, cost: float
) -> None:
    with pytest.raises(ValueError):
        await limiter.spend("k", rate=rate, burst=burst, need=need, cost=cost)


async def test_token_quota_over_the_limiter(limiter: RateLimiter) -> None:
    quota = TokenQuota(limiter, tokens=100, window=10.0)  # 10 tokens a second
    assert await quota.wait("ann") == 0.0
    await quota.charge("ann", 0)  # nothing generated: nothing charged
    await quota.charge("ann", 60)
    assert await quota.wait("ann") == 0.0  # 40 left: the next chat may start
    await quota.charge("ann", 90)  # an answer longer than what was left: -50
    retry_after = await quota.wait("ann")
    assert 5.0 < retry_after <= 5.1  # 51 tokens at 10 a second
    assert await quota.wait("bob") == 0.0  # users are independent


@pytest.mark.parametrize(
    ("tokens", "window"), [(0, 10.0), (10, 0.0)], ids=["no-tokens", "no-window"]
)
def test_token_quota_needs_tokens_and_a_window(tokens: int, window: float) -> None:
    with pytest.raises(ValueError):
        TokenQuota(MemoryRateLimiter(), tokens=tokens, window=window)


async def test_memory_limiter_keeps_no_bucket_for_a_check() -> None:
    limiter = MemoryRateLimiter()
    assert await limiter.spend("k", rate=1.0, burst=5, need=1, cost=0) == 0.0
    assert len(limiter) == 0


async def test_redis_quota_bucket_expires_when_paid_back(redis_clean: str) -> None:
    limiter = RedisRateLimiter(redis_clean)
    raw = Redis.from_url(redis_clean)
    try:
        quota = TokenQuota(limiter, tokens=100, window=100.0)  # 1 token a second
        assert await quota.wait("ann") == 0.0
        assert await raw.exists(bucket_key(quota_key("ann"))) == 0  # a check writes nothing
        await quota.charge("ann", 150)
        # From -50 back to 100 at one token a second.
        assert 149_000 < await raw.pttl(bucket_key(quota_key("ann"))) <= 150_000
    finally:
        await raw.aclose()
        await limiter.aclose()


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


QUOTA = 50  # tokens per window: less than one demo answer, so one answer overdraws it


async def test_a_user_over_the_token_quota_is_refused_and_others_are_not(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(token_quota=QUOTA, token_quota_window=3600)
    before = server.metrics()["tokenwire_rate_limited_total"]
    ann = await Client.connect(server)
    bob = await Client.connect(server)
    try:
        first, conversation = await start_chat(ann, "spend my quota")
        answered = await ann.until_end(first)
        assert answered.end is not None and answered.end["type"] == "done"
        assert answered.last == len(demo_tokens("spend my quota")) > QUOTA

        # Ann overdrew: her next chat waits until the debt is paid back at 50 an hour.
        refused = new_id()
        await ann.send(type="chat", id=refused, conversation=new_id(), text="one more")
        error = await ann.until(lambda f: f["type"] in ("ack", "error") and f["id"] == refused)
        assert (error["type"], error["code"], error["retryable"]) == ("error", "rate_limited", True)
        debt = answered.last - QUOTA
        assert (debt + 1) * 3600 / QUOTA - 60 < error["retry_after"] <= (debt + 1) * 3600 / QUOTA

        # Her connection carries on, and a replay of her earlier chat is free.
        await ann.send(type="ping", t=3)
        assert await ann.until(lambda f: f["type"] == "pong") == {"type": "pong", "t": 3}
        await ann.send(type="chat", id=first, conversation=conversation, text="spend my quota")
        ack = await ann.until(lambda f: f["type"] in ("ack", "error") and f["id"] == first)
        assert ack == {"type": "ack", "id": first, "conversation": conversation}
        replay = (await ann.until_end(first)).end
        assert replay is not None and replay["type"] == "done"

        # Over HTTP too: 429 with Retry-After for Ann, while Bob's quota is his own.
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
            body = {"id": new_id(), "conversation": new_id(), "text": "by http"}
            response = await http.post("/api/chat", json=body, headers={"Cookie": ann.cookie})
            assert response.status_code == 429
            assert int(response.headers["retry-after"]) >= error["retry_after"]
            assert response.json()["code"] == "rate_limited"
            response = await http.post("/api/chat", json=body, headers={"Cookie": bob.cookie})
            assert response.status_code == 202, response.text
        stream, _ = await start_chat(bob, "my own quota")
        bob_view = await bob.until_end(stream)
        assert bob_view.end is not None and bob_view.end["type"] == "done"
        assert server.metrics()["tokenwire_rate_limited_total"] == before + 2
    finally:
        await ann.close()
        await bob.close()


async def test_a_running_answer_counts_against_the_quota_before_it_ends(tmp_path: Path) -> None:
    # About 800 tokens at 100 a second: the answer runs for some 8 s, and its tokens are
    # charged every QUOTA_CHARGE_INTERVAL meanwhile, not only at its end.
    runtime = Runtime(
        Settings(
            db=str(tmp_path / "history.db"),
            token_quota=QUOTA,
            demo_first_token_delay=0.0,
            demo_tokens_per_second=100,
            demo_paragraphs=10,
        )
    )
    async with runtime.lifespan():
        chat = runtime.chat
        assert chat.quota is not None
        await chat.start("ann", "long", "c1", "a long answer", origin="test")
        deadline = time.monotonic() + TIMEOUT
        while await chat.quota.wait("ann") == 0.0:
            assert time.monotonic() < deadline, "the running answer was never charged"
            await asyncio.sleep(0.05)
        assert chat.active_streams == 1  # charged while it still runs
        with pytest.raises(ProtocolError) as refused:
            await chat.start("ann", "next", "c2", "another", origin="test")
        assert (refused.value.frame.code, refused.value.frame.retryable) == ("rate_limited", True)
        assert await chat.quota.wait("bob") == 0.0


async def test_no_token_quota_when_it_is_zero(make_server: Callable[..., Server]) -> None:
    server = make_server(token_quota=0, demo_paragraphs=0)
    client = await Client.connect(server)
    try:
        for text in ("one", "two", "three"):  # well past a quota of a few tokens
            stream, _ = await start_chat(client, text)
            end = (await client.until_end(stream)).end
            assert end is not None and end["type"] == "done"
    finally:
        await client.close()


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
