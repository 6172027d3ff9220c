"""What tokenwire keeps, each part a contract (`base.py`) with one backend per process kind:
in memory or SQLite for one process, Redis for many processes acting as one.

- `broker`: live events per user and per node (publish, subscribe);
- `streams`: each answer's stream log, for resume and replay;
- `history`: conversations and their messages;
- `leases`: which node runs a generation;
- `request_ids`: the first `chat` with an id starts a generation, repeats replay it;
- `ratelimit`: token buckets for chats, connections and each user's token quota.

All Redis connection code is in `redis_connection` (URL check, pools, key tags, the reply
reader) and `redis_pipeline` (automatic pipelining). See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.settings import Settings
from backend.storage.broker import Broker, MemoryBroker
from backend.storage.broker.redis import RedisBroker
from backend.storage.history import SqliteHistory
from backend.storage.history.base import History
from backend.storage.history.redis import RedisHistory
from backend.storage.leases import Leases, MemoryLeases, RedisLeases
from backend.storage.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from backend.storage.request_ids import MemoryRequestRegistry, RequestRegistry
from backend.storage.request_ids.redis import RedisRequestRegistry
from backend.storage.streams import MemoryStreamLog, StreamLog
from backend.storage.streams.redis import RedisStreamLog


@dataclass(eq=False)
class Storage:
    """Every stored part of one process, opened together and closed together."""

    broker: Broker
    log: StreamLog
    history: History
    request_ids: RequestRegistry
    leases: Leases
    limiter: RateLimiter

    async def aclose(self) -> None:
        """Close every part, the broker last (the others may still publish while closing)."""
        await self.history.aclose()
        await self.log.aclose()
        await self.leases.aclose()
        await self.limiter.aclose()
        await self.request_ids.aclose()
        await self.broker.aclose()


async def open_storage(settings: Settings) -> Storage:
    """The backends `settings` ask for: Redis for every part when `redis_url` is set (many
    processes act as one), else memory and SQLite (one process)."""
    s = settings
    if s.redis_url:
        broker = RedisBroker(s.redis_url)
        await broker.open()
        return Storage(
            broker=broker,
            log=RedisStreamLog(s.redis_url, max_tokens=s.stream_max_tokens),
            history=RedisHistory(s.redis_url),
            request_ids=RedisRequestRegistry(s.redis_url),
            leases=RedisLeases(s.redis_url),
            limiter=RedisRateLimiter(s.redis_url),
        )
    return Storage(
        broker=MemoryBroker(),
        log=MemoryStreamLog(max_tokens=s.stream_max_tokens),
        history=await SqliteHistory.open(s.db),
        request_ids=MemoryRequestRegistry(),
        leases=MemoryLeases(),
        limiter=MemoryRateLimiter(),
    )
