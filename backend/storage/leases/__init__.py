"""Generation leases: which node runs a stream's generation, for as long as it is alive.

A node holds the lease of each generation it runs and renews it while it runs. A cancel
for a stream not running here goes to the lease holder's node; a stream that is not
finished and whose lease has lapsed lost its producer (its node died), and any node may
end it with a retryable `provider_error` so no reader waits for it forever.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from redis.asyncio import Redis

from backend.storage.redis_connection import DEFAULT_MAX_CONNECTIONS, key_tag, redis_client, ttl_ms
from backend.storage.redis_pipeline import Pipeliner


class Leases(ABC):
    """Contract: after `acquire(key, node, ttl)`, `holder(key)` is `node` until `ttl`
    passes without a successful `renew` by that node, or until it `release`s; `renew` and
    `release` by any other node change nothing (`renew` returns False)."""

    @abstractmethod
    async def acquire(self, key: str, node: str, ttl: float) -> None: ...

    @abstractmethod
    async def renew(self, key: str, node: str, ttl: float) -> bool: ...

    @abstractmethod
    async def release(self, key: str, node: str) -> None: ...

    @abstractmethod
    async def holder(self, key: str) -> str | None: ...

    async def aclose(self) -> None:
        """Release connections."""


class MemoryLeases(Leases):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._leases: dict[str, tuple[str, float]] = {}

    async def acquire(self, key: str, node: str, ttl: float) -> None:
        self._leases[key] = (node, self._clock() + ttl)

    async def renew(self, key: str, node: str, ttl: float) -> bool:
        if await self.holder(key) != node:
            return False
        self._leases[key] = (node, self._clock() + ttl)
        return True

    async def release(self, key: str, node: str) -> None:
        if await self.holder(key) == node:
            del self._leases[key]

    async def holder(self, key: str) -> str | None:
        found = self._leases.get(key)
        if found is None:
            return None
        if found[1] <= self._clock():
            del self._leases[key]
            return None
        return found[0]


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


def lease_key(key: str) -> str:
    return f"tw:lease:{key_tag(key)}"


class RedisLeases(Leases):
    """Leases as Redis keys holding the node's name, with a TTL (checked by scripts, so a
    node never renews or drops a lease that lapsed and went to another)."""

    def __init__(self, url: str, *, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self._redis: Redis = redis_client(url, max_connections=max_connections)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        # A node renews every lease it holds at once: hundreds of commands in one write,
        # instead of a burst of round trips that stalled the node's streams (bench/latency).
        self._commands = Pipeliner(self._redis, name="redis leases")

    async def acquire(self, key: str, node: str, ttl: float) -> None:
        await self._commands.command("SET", lease_key(key), node, "PX", ttl_ms(ttl))

    async def renew(self, key: str, node: str, ttl: float) -> bool:
        renewed = await self._commands.script(self._renew, [lease_key(key)], [node, ttl_ms(ttl)])
        return bool(renewed)

    async def release(self, key: str, node: str) -> None:
        await self._commands.script(self._release, [lease_key(key)], [node])

    async def holder(self, key: str) -> str | None:
        value = await self._commands.command("GET", lease_key(key))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def aclose(self) -> None:
        await self._commands.aclose()
        await self._redis.aclose()
