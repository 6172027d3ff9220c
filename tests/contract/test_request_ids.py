"""Request-id claims: one generation per (user, id), repeats replay, other content conflicts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from backend.storage.request_ids import (
    DEFAULT_CLAIM_TTL,
    Claim,
    MemoryRequestRegistry,
    RequestRegistry,
    fingerprint,
)
from backend.storage.request_ids.redis import RedisRequestRegistry

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 5.0
TTL = 100.0
POLL = 0.01

BACKENDS = ["memory", "redis"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[RequestRegistry]:
    """A registry of each backend with the default ttl (expiry and bounds are backend-specific
    and tested per backend below)."""
    if request.param == "memory":
        yield MemoryRequestRegistry()
    elif request.param == "redis":
        redis_registry = RedisRequestRegistry(request.getfixturevalue("redis_clean"))
        yield redis_registry
        await redis_registry.aclose()
    else:
        raise NotImplementedError(request.param)


HELLO = fingerprint("c1", "hello")

CLAIMS = [
    pytest.param([("alice", "r1", HELLO, Claim.NEW)], id="first"),
    pytest.param(
        [("alice", "r1", HELLO, Claim.NEW), ("alice", "r1", HELLO, Claim.SAME)], id="repeat"
    ),
    pytest.param(
        [
            ("alice", "r1", HELLO, Claim.NEW),
            ("alice", "r1", fingerprint("c1", "hello!"), Claim.CONFLICT),
            ("alice", "r1", fingerprint("c2", "hello"), Claim.CONFLICT),
            ("alice", "r1", HELLO, Claim.SAME),
        ],
        id="other-content-conflicts-and-changes-nothing",
    ),
    pytest.param(
        [
            ("alice", "r1", HELLO, Claim.NEW),
            ("bob", "r1", HELLO, Claim.NEW),
            ("bob", "r1", fingerprint("c9", "other"), Claim.CONFLICT),
            ("carol", "r1", fingerprint("c9", "other"), Claim.NEW),
            ("alice", "r1", HELLO, Claim.SAME),
        ],
        id="per-user",
    ),
    pytest.param(
        [
            ("alice", "r1", HELLO, Claim.NEW),
            ("alice", "r2", HELLO, Claim.NEW),
            ("alice", "r2", HELLO, Claim.SAME),
        ],
        id="per-id",
    ),
]


@pytest.mark.parametrize("claims", CLAIMS)
async def test_claims(registry: RequestRegistry, claims: list[tuple[str, str, str, Claim]]) -> None:
    for user, id, print_, expected in claims:
        assert await registry.claim(user, id, print_) is expected, (user, id)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param(("c1", "hello"), ("c1", "hello!"), id="text"),
        pytest.param(("c1", "hello"), ("c2", "hello"), id="conversation"),
        pytest.param(("c1", "ab"), ("c1a", "b"), id="boundary"),
        pytest.param(("c1", ""), ("c1", " "), id="empty-text"),
    ],
)
def test_fingerprint_tells_content_apart(a: tuple[str, str], b: tuple[str, str]) -> None:
    assert fingerprint(*a) == fingerprint(*a)
    assert fingerprint(*a) != fingerprint(*b)


async def test_known(registry: RequestRegistry) -> None:
    assert await registry.known("alice", "r1") is False
    await registry.claim("alice", "r1", HELLO)
    assert await registry.known("alice", "r1") is True
    assert await registry.known("bob", "r1") is False
    assert await registry.known("alice", "r2") is False


async def test_a_conflict_is_not_a_claim(registry: RequestRegistry) -> None:
    await registry.claim("alice", "r1", HELLO)
    assert await registry.claim("alice", "r1", fingerprint("c1", "other")) is Claim.CONFLICT
    assert await registry.known("alice", "r1") is True


async def test_claims_expire_after_ttl() -> None:
    clock = FakeClock()
    registry = MemoryRequestRegistry(ttl=TTL, clock=clock)
    await registry.claim("alice", "r1", HELLO)
    clock.now += TTL / 2
    await registry.claim("alice", "r2", HELLO)
    clock.now += TTL / 2 - 1  # r1 is one second short of its ttl
    assert await registry.known("alice", "r1") is True
    assert await registry.claim("alice", "r1", HELLO) is Claim.SAME
    clock.now += 2  # r1 has lived past its ttl, r2 has not
    assert await registry.known("alice", "r1") is False
    assert await registry.known("alice", "r2") is True
    assert await registry.claim("alice", "r1", fingerprint("c1", "other")) is Claim.NEW
    assert await registry.claim("alice", "r2", HELLO) is Claim.SAME


async def test_default_ttl_is_a_day() -> None:
    clock = FakeClock()
    registry = MemoryRequestRegistry(clock=clock)
    await registry.claim("alice", "r1", HELLO)
    clock.now += DEFAULT_CLAIM_TTL - 1
    assert await registry.claim("alice", "r1", HELLO) is Claim.SAME
    clock.now += 2
    assert await registry.known("alice", "r1") is False


async def test_bound_evicts_the_oldest_claim() -> None:
    registry = MemoryRequestRegistry(max_claims=3)
    for id in ("r1", "r2", "r3", "r4"):
        assert await registry.claim("alice", id, HELLO) is Claim.NEW
    assert [await registry.known("alice", id) for id in ("r1", "r2", "r3", "r4")] == [
        False,
        True,
        True,
        True,
    ]
    assert await registry.claim("alice", "r1", HELLO) is Claim.NEW  # evicted: forgotten
    assert await registry.known("alice", "r2") is False
    assert await registry.claim("alice", "r4", HELLO) is Claim.SAME


@pytest.mark.parametrize("same_content", [True, False], ids=["same-content", "other-content"])
async def test_concurrent_claims_of_one_id_make_exactly_one_new(
    registry: RequestRegistry, same_content: bool
) -> None:
    prints = [HELLO if same_content else fingerprint("c1", f"text {i}") for i in range(100)]
    async with asyncio.timeout(TIMEOUT):
        results = await asyncio.gather(*(registry.claim("alice", "r1", p) for p in prints))
    assert results.count(Claim.NEW) == 1
    others = Claim.SAME if same_content else Claim.CONFLICT
    assert results.count(others) == 99


async def test_redis_claims_expire_after_ttl(redis_clean: str) -> None:
    """Redis keeps time itself: a real short ttl, waited for by polling."""
    registry = RedisRequestRegistry(redis_clean, ttl=0.3)
    try:
        await registry.claim("alice", "r1", HELLO)
        assert await registry.known("alice", "r1") is True
        assert await registry.claim("alice", "r1", HELLO) is Claim.SAME
        async with asyncio.timeout(TIMEOUT):
            while True:  # poll: Redis expires the key on its own clock
                if not await registry.known("alice", "r1"):
                    break
                await asyncio.sleep(POLL)
        assert await registry.claim("alice", "r1", fingerprint("c1", "other")) is Claim.NEW
    finally:
        await registry.aclose()


async def test_redis_claims_are_shared_between_nodes(redis_clean: str) -> None:
    nodes = [RedisRequestRegistry(redis_clean) for _ in range(3)]
    try:
        async with asyncio.timeout(TIMEOUT):
            results = await asyncio.gather(
                *(nodes[i % 3].claim("alice", "r1", HELLO) for i in range(30))
            )
        assert results.count(Claim.NEW) == 1
        assert results.count(Claim.SAME) == 29
        assert await nodes[1].known("alice", "r1") is True
    finally:
        for node in nodes:
            await node.aclose()


def test_redis_url_is_checked() -> None:
    with pytest.raises(ValueError, match=r"TOKENWIRE_REDIS_URL must start with redis://"):
        RedisRequestRegistry("127.0.0.1:6379")
