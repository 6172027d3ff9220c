"""The generation-lease contract, over every backend (a real redis-server for `redis`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from backend.storage.leases import Leases, MemoryLeases, RedisLeases

TTL = 0.3


@pytest.fixture(params=["memory", "redis"])
async def leases(request: pytest.FixtureRequest) -> AsyncIterator[Leases]:
    store: Leases
    if request.param == "memory":
        store = MemoryLeases()
    else:
        store = RedisLeases(request.getfixturevalue("redis_clean"))
    yield store
    await store.aclose()


async def until_released(leases: Leases, key: str) -> None:
    deadline = time.monotonic() + 5
    while await leases.holder(key) is not None:
        assert time.monotonic() < deadline, "the lease never lapsed"
        await asyncio.sleep(0.02)


async def test_holder_until_it_lapses(leases: Leases) -> None:
    assert await leases.holder("s1") is None
    await leases.acquire("s1", "node-a", TTL)
    assert await leases.holder("s1") == "node-a"
    started = time.monotonic()
    await until_released(leases, "s1")
    assert time.monotonic() - started > TTL / 2  # it did last (a bound, not a timing)


async def test_renew_keeps_it_and_only_the_holder_may(leases: Leases) -> None:
    await leases.acquire("s1", "node-a", TTL)
    assert await leases.renew("s1", "node-b", TTL) is False
    for _ in range(5):  # renewed across more than one TTL, it never lapses
        assert await leases.renew("s1", "node-a", TTL) is True
        assert await leases.holder("s1") == "node-a"
        await asyncio.sleep(TTL / 3)
    assert await leases.holder("s1") == "node-a"


async def test_a_lapsed_lease_cannot_be_renewed(leases: Leases) -> None:
    await leases.acquire("s1", "node-a", 0.05)
    await until_released(leases, "s1")
    assert await leases.renew("s1", "node-a", TTL) is False
    assert await leases.holder("s1") is None


async def test_release_by_the_holder_only(leases: Leases) -> None:
    await leases.acquire("s1", "node-a", 10)
    await leases.release("s1", "node-b")
    assert await leases.holder("s1") == "node-a"
    await leases.release("s1", "node-a")
    assert await leases.holder("s1") is None


async def test_keys_are_independent(leases: Leases) -> None:
    await leases.acquire("u1:s1", "node-a", 10)
    await leases.acquire("u2:s1", "node-b", 10)
    assert await leases.holder("u1:s1") == "node-a"
    assert await leases.holder("u2:s1") == "node-b"
