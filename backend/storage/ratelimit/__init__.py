"""Token-bucket rate limits: new chats per user, connection attempts per client address,
and each user's quota of generated tokens per time window.

A bucket holds up to `burst` tokens and refills at `rate` tokens per second; a request of
`cost` tokens passes if the bucket holds that many, and otherwise learns how long until it
would (its `retry_after`). A refused request takes nothing. The token quota is a bucket
too, used in two steps: a new chat needs it to hold at least one token but takes nothing,
and the tokens an answer actually generated are charged as it runs and when it ends,
whatever is left, so the bucket may go below zero: a debt that refilling pays back before
the next chat passes.
The arithmetic is one pure function, `spend_from_bucket`; `MemoryRateLimiter` runs it on a
bounded dict and `RedisRateLimiter` runs the same arithmetic in one Lua script (atomic, on
Redis's clock, so every node shares the buckets and no node's clock skew matters).

Deliberate choices a reader might want to "fix":

- A bucket that has refilled to `burst` is indistinguishable from one never used, so it
  is dropped (memory) or expires (Redis): idle keys cost nothing.
- The memory limiter bounds its number of buckets; past the bound it forgets the least
  recently used one, which then starts full again. Under a flood of distinct keys this
  errs on the side of letting requests through rather than growing without bound.
- The quota is charged in batches (the chat service charges each user's running answers
  every second, and the rest when each ends), not token by token: a user can overdraw by
  what their running answers generate meanwhile; the debt is then paid back before any
  new chat starts. An answer already running is never cut for the quota.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from redis.asyncio import Redis

from backend.storage.redis_connection import DEFAULT_MAX_CONNECTIONS, key_tag, redis_client

DEFAULT_MAX_BUCKETS: Final = 100_000  # memory limiter: buckets kept at most


@dataclass(frozen=True)
class Bucket:
    """`tokens` available at time `stamp` (seconds, on the limiter's clock)."""

    tokens: float
    stamp: float


def check_limit(rate: float, burst: float, cost: float) -> None:
    """A `ValueError` for a limit no request could ever pass or that never refills."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 (got {rate})")
    if not 0 < cost <= burst:
        raise ValueError(f"cost must be > 0 and <= burst (got cost {cost}, burst {burst})")


def check_spend(rate: float, burst: float, need: float | None, cost: float) -> None:
    """A `ValueError` for a spend that could never pass or a bucket that never refills."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 (got {rate})")
    if not burst > 0:
        raise ValueError(f"burst must be > 0 (got {burst})")
    if need is not None and not 0 < need <= burst:
        raise ValueError(f"need must be > 0 and <= burst (got need {need}, burst {burst})")
    if not cost >= 0:
        raise ValueError(f"cost must be >= 0 (got {cost})")


def spend_from_bucket(
    bucket: Bucket | None, now: float, rate: float, burst: float, need: float | None, cost: float
) -> tuple[Bucket | None, float]:
    """At `now`: if `need` is None or the bucket holds at least `need` tokens, take `cost`
    (which may be more than it holds: the bucket goes below zero) and return (the bucket
    afterwards, 0.0); else (the bucket unchanged, seconds until it will hold `need`).
    `None` is a full bucket; a spend of nothing returns the bucket unchanged."""
    if bucket is None:
        tokens = burst
    else:
        tokens = min(burst, bucket.tokens + max(0.0, now - bucket.stamp) * rate)
    if need is not None and tokens < need:
        return bucket, (need - tokens) / rate
    if cost == 0:
        return bucket, 0.0
    return Bucket(tokens - cost, now), 0.0


def take_from_bucket(
    bucket: Bucket | None, now: float, rate: float, burst: float, cost: float = 1.0
) -> tuple[Bucket | None, float]:
    """Take `cost` tokens at `now`: (the bucket afterwards, 0.0) if they were there, else
    (the bucket unchanged, seconds until they will be). `None` is a full bucket."""
    return spend_from_bucket(bucket, now, rate, burst, need=cost, cost=cost)


def full_at(bucket: Bucket, rate: float, burst: float) -> float:
    """When `bucket` will have refilled to `burst` (and may be forgotten)."""
    return bucket.stamp + (burst - bucket.tokens) / rate


def retry_after_rounded(seconds: float) -> float:
    """A wait for clients: rounded up to a tenth of a second (at least one), so retrying
    then passes. Float noise below a millionth of a tenth is not rounded up (0.3 stays 0.3)."""
    return max(1, math.ceil(round(seconds * 10, 6))) / 10


class RateLimiter(ABC):
    """Contract: `spend` (and so `take`) is atomic per key: of concurrent takes on a bucket
    holding n tokens, exactly those whose costs fit in n pass (with cost 1, exactly n), and
    concurrent unconditional spends all count. A refused spend changes nothing. Keys are
    independent. `rate` and `burst` may differ per call but are meant to be fixed per key."""

    @abstractmethod
    async def spend(
        self, key: str, rate: float, burst: float, *, need: float | None, cost: float
    ) -> float:
        """0.0 if `key`'s bucket held at least `need` tokens (or `need` is None) and `cost`
        was taken from it, possibly below zero; else the seconds to wait until it holds
        `need`, and nothing is taken."""

    async def take(self, key: str, rate: float, burst: float, cost: float = 1.0) -> float:
        """0.0 if `cost` tokens were taken from `key`'s bucket, else the seconds to wait
        before the same take would pass."""
        check_limit(rate, burst, cost)
        return await self.spend(key, rate, burst, need=cost, cost=cost)

    async def aclose(self) -> None:
        """Release connections."""


class MemoryRateLimiter(RateLimiter):
    def __init__(
        self,
        max_buckets: int = DEFAULT_MAX_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_buckets < 1:
            raise ValueError(f"max_buckets must be >= 1 (got {max_buckets})")
        self._max, self._clock = max_buckets, clock
        # Least recently used first; each entry is (bucket, when it is full again).
        self._buckets: OrderedDict[str, tuple[Bucket, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    async def spend(
        self, key: str, rate: float, burst: float, *, need: float | None, cost: float
    ) -> float:
        check_spend(rate, burst, need, cost)
        now = self._clock()
        self._drop_full(now)
        found = self._buckets.get(key)
        bucket, retry_after = spend_from_bucket(
            None if found is None else found[0], now, rate, burst, need, cost
        )
        if bucket is not None and retry_after == 0.0 and cost > 0:
            self._buckets[key] = (bucket, full_at(bucket, rate, burst))
            self._buckets.move_to_end(key)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        return retry_after

    def _drop_full(self, now: float) -> None:
        # Amortised: only from the least recently used end, which is where idle buckets
        # gather; a full bucket further in is dropped when it reaches the front.
        while self._buckets:
            key, (_, full) = next(iter(self._buckets.items()))
            if full > now:
                break
            del self._buckets[key]


# Same arithmetic as `spend_from_bucket`, on Redis's clock. The hash holds `tokens` and
# `stamp`; the key expires when the bucket is full again. An empty `need` spends
# unconditionally. Numbers leave as strings (a Lua number reply would be truncated to an
# integer).
_SPEND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local need = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = burst
else
  tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
end
if need ~= nil and tokens < need then
  return tostring((need - tokens) / rate)
end
if cost > 0 then
  tokens = tokens - cost
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil((burst - tokens) / rate * 1000)))
end
return '0'
"""


def bucket_key(key: str) -> str:
    return f"tw:rl:{key_tag(key)}"


class RedisRateLimiter(RateLimiter):
    """Buckets as Redis hashes `tw:rl:{key}`, shared by every node."""

    def __init__(self, url: str, *, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self._redis: Redis = redis_client(url, max_connections=max_connections)
        self._spend = self._redis.register_script(_SPEND)
        self._closed = False

    async def spend(
        self, key: str, rate: float, burst: float, *, need: float | None, cost: float
    ) -> float:
        check_spend(rate, burst, need, cost)
        args = [repr(rate), repr(burst), repr(cost), "" if need is None else repr(need)]
        reply = await self._spend(keys=[bucket_key(key)], args=args)
        return float(reply.decode() if isinstance(reply, bytes) else reply)

    async def aclose(self) -> None:
        """Close the connections; calling it again does nothing."""
        if not self._closed:
            self._closed = True
            await self._redis.aclose()


@dataclass(frozen=True)
class TokenQuota:
    """Each user may have `tokens` generated per `window` seconds, as a bucket of that
    capacity refilling evenly over the window. A new chat needs the bucket to hold at least
    one token (`wait`); an answer's tokens are charged as they are generated (`charge`),
    whatever is left, so a user who overdrew waits until the debt is paid back."""

    limiter: RateLimiter
    tokens: int
    window: float

    def __post_init__(self) -> None:
        if self.tokens < 1 or not self.window > 0:
            raise ValueError(
                f"a token quota needs tokens >= 1 and window > 0 (got {self.tokens}, {self.window})"
            )

    @property
    def rate(self) -> float:
        return self.tokens / self.window

    async def wait(self, user: str) -> float:
        """0.0 if `user` may start a new chat, else the seconds until they may."""
        return await self.limiter.spend(quota_key(user), self.rate, self.tokens, need=1, cost=0)

    async def charge(self, user: str, tokens: int) -> None:
        """Count `tokens` generated for `user` (nothing for zero)."""
        if tokens > 0:
            await self.limiter.spend(
                quota_key(user), self.rate, self.tokens, need=None, cost=tokens
            )


def quota_key(user: str) -> str:
    return f"quota:{user}"
