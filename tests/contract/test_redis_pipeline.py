"""The pipeliner against a real redis-server: concurrent commands share round trips, each
caller gets its own reply or error, scripts survive a Redis that forgot them, and nothing
waits forever when Redis is gone, stops answering, or the pipeliner is closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from backend.storage.redis_connection import redis_client
from backend.storage.redis_pipeline import Pipeliner
from harness.redis_server import RedisServer

TIMEOUT = 10.0
SCRIPT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture
async def client(redis_clean: str) -> AsyncIterator[Redis]:
    redis = redis_client(redis_clean, max_connections=2)
    yield redis
    async with asyncio.timeout(TIMEOUT):
        await redis.aclose()


async def test_concurrent_commands_share_round_trips(client: Redis) -> None:
    pipeliner = Pipeliner(client, name="test")
    try:
        async with asyncio.timeout(TIMEOUT):
            replies = await asyncio.gather(
                *(pipeliner.command("INCRBY", f"k{n % 10}", n) for n in range(1000))
            )
    finally:
        await pipeliner.aclose()
    # Each caller got its own command's reply: INCRBY returns the running total of its key,
    # so the replies of one key are distinct and the last is the sum of what was added.
    for key in range(10):
        added = [n for n in range(1000) if n % 10 == key]
        mine = [replies[n] for n in added]
        assert len(set(mine)) == len(mine)
        assert max(mine) == sum(added)
    # All were queued in one turn of the event loop: they went in one write.
    assert pipeliner.batches == 1


async def test_each_caller_gets_its_own_error(client: Redis) -> None:
    pipeliner = Pipeliner(client, name="test")
    try:
        await client.set("text", "not a number")
        async with asyncio.timeout(TIMEOUT):
            results = await asyncio.gather(
                pipeliner.command("INCR", "counter"),
                pipeliner.command("INCR", "text"),
                pipeliner.command("INCR", "counter"),
                return_exceptions=True,
            )
    finally:
        await pipeliner.aclose()
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], ResponseError)


async def test_scripts_are_loaded_again_when_redis_forgot_them(client: Redis) -> None:
    script = client.register_script(SCRIPT)
    pipeliner = Pipeliner(client, name="test")
    try:
        async with asyncio.timeout(TIMEOUT):
            # Never loaded yet: the first batch meets NOSCRIPT and sends them again.
            first = await asyncio.gather(*(pipeliner.script(script, ["n"], [1]) for _ in range(5)))
            await client.script_flush()
            again = await pipeliner.script(script, ["n"], [10])
    finally:
        await pipeliner.aclose()
    assert sorted(first) == [1, 2, 3, 4, 5]  # each ran exactly once
    assert again == 15
    assert int(await client.get("n")) == 15


async def test_a_cancelled_caller_does_not_disturb_the_others(client: Redis) -> None:
    pipeliner = Pipeliner(client, name="test")
    try:
        async with asyncio.timeout(TIMEOUT):
            waiting = asyncio.create_task(pipeliner.command("INCR", "a"))
            others = [asyncio.create_task(pipeliner.command("INCR", "b")) for _ in range(3)]
            await asyncio.sleep(0)  # all are queued (or on the wire) now
            waiting.cancel()
            assert sorted(await asyncio.gather(*others)) == [1, 2, 3]
            assert await pipeliner.command("INCR", "b") == 4
    finally:
        await pipeliner.aclose()


async def test_redis_gone_fails_every_caller(own_redis: RedisServer) -> None:
    redis = redis_client(own_redis.url)
    pipeliner = Pipeliner(redis, name="test")
    try:
        async with asyncio.timeout(TIMEOUT):
            assert await pipeliner.command("PING") == b"PONG"
        await asyncio.to_thread(own_redis.stop)
        async with asyncio.timeout(TIMEOUT):
            results = await asyncio.gather(
                *(pipeliner.command("PING") for _ in range(10)), return_exceptions=True
            )
        assert all(isinstance(r, Exception) for r in results), results
        await asyncio.to_thread(own_redis.start)
        async with asyncio.timeout(TIMEOUT):
            assert await pipeliner.command("PING") == b"PONG"  # and it recovers
    finally:
        await pipeliner.aclose()
        await redis.aclose()


async def test_a_closed_pipeliner_refuses_commands(client: Redis) -> None:
    pipeliner = Pipeliner(client, name="test")
    assert await pipeliner.command("PING") == b"PONG"
    await pipeliner.aclose()
    await pipeliner.aclose()  # idempotent
    with pytest.raises(ConnectionError, match="closed"):
        await pipeliner.command("PING")


async def test_a_bad_argument_fails_only_its_caller(client: Redis) -> None:
    pipeliner = Pipeliner(client, name="test")
    try:
        async with asyncio.timeout(TIMEOUT):
            results = await asyncio.gather(
                pipeliner.command("INCR", "n"),
                pipeliner.command("SET", "k", None),  # no Redis value: refused before sending
                pipeliner.command("INCR", "n"),
                return_exceptions=True,
            )
    finally:
        await pipeliner.aclose()
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], TypeError)
    assert pipeliner.batches == 1  # and the others went together as usual


async def test_no_reply_in_time_fails_what_is_in_flight_then_recovers(client: Redis) -> None:
    pipeliner = Pipeliner(client, name="test", reply_timeout=0.3)
    try:
        async with asyncio.timeout(TIMEOUT):
            assert await pipeliner.command("PING") == b"PONG"
            # Redis stops answering this client for longer than the reply timeout.
            await client.execute_command("CLIENT", "PAUSE", 1500, "ALL")
            results = await asyncio.gather(
                *(pipeliner.command("INCR", "n") for _ in range(3)), return_exceptions=True
            )
            assert all(isinstance(r, RedisTimeoutError) for r in results), results
            # A new connection once Redis answers again; the paused INCRs may still have
            # run (like any command whose reply was lost), but each at most once.
            assert await pipeliner.command("INCR", "n") in (1, 4)
    finally:
        await pipeliner.aclose()
