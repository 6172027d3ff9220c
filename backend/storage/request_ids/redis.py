"""Request-id claims in Redis, shared by every node (the `RequestRegistry` contract).

One key per claim, `tw:req:{user}:<id>` (`{user}` is the escaped hash tag of
`backend.storage.redis_connection`), holding the claim's fingerprint and expiring `ttl`
seconds after the first claim. `claim` is one `SET NX GET PX` (Redis >= 7.0): it stores the
fingerprint only if the key is absent and returns what was there, so of concurrent claims,
on any nodes, exactly one is NEW. Redis bounds the number of claims by their ttl (and by its own
`maxmemory` policy); there is no count bound as in the memory registry.
"""

from __future__ import annotations

from redis.asyncio import Redis

from backend.storage.redis_connection import DEFAULT_MAX_CONNECTIONS, key_tag, redis_client, ttl_ms
from backend.storage.request_ids import DEFAULT_CLAIM_TTL, Claim, RequestRegistry


def claim_key(user: str, id: str) -> str:
    return f"tw:req:{key_tag(user)}:{id}"


class RedisRequestRegistry(RequestRegistry):
    def __init__(
        self,
        url: str,
        ttl: float = DEFAULT_CLAIM_TTL,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self._redis: Redis = redis_client(url, max_connections=max_connections)
        self._ttl_ms = ttl_ms(ttl)
        self._closed = False

    async def aclose(self) -> None:
        """Close the connections; calling it again does nothing."""
        if not self._closed:
            self._closed = True
            await self._redis.aclose()

    async def claim(self, user: str, id: str, fingerprint: str) -> Claim:
        previous = await self._redis.set(
            claim_key(user, id), fingerprint, nx=True, get=True, px=self._ttl_ms
        )
        if previous is None:
            return Claim.NEW
        return Claim.SAME if previous == fingerprint.encode() else Claim.CONFLICT

    async def known(self, user: str, id: str) -> bool:
        return int(await self._redis.exists(claim_key(user, id))) == 1
