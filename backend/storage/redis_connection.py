"""Connections to Redis shared by the Redis backends: URL check, bounded pools, key tags.

Deliberate choices a reader might want to "fix":

- Every client gets a `BlockingConnectionPool` with an explicit `max_connections`: when all
  connections are busy a caller waits (up to `DEFAULT_POOL_TIMEOUT`) instead of failing.
  redis-py's default pool allows 100 connections and then raises, which under 1,000
  concurrent publishers silently dropped the tokens of about 100 streams (FIELD-NOTES.md).
- Commands are not retried by redis-py: a retried EVALSHA whose first reply was lost would
  run a write twice. A stale pooled connection (Redis restarted) is still replaced on
  checkout by the pool itself, so a restart costs no error once Redis is back.
- RESP2, explicitly. redis-py 8 speaks RESP3 by default and then enables "maintenance
  notifications", under which the pool hands out a connection that the server has closed
  (after a Redis restart, the first command on each old connection failed).
- `ReplyReader` reads replies straight off a redis-py connection's stream and parses them
  with hiredis, every reply of a read at once: redis-py's `read_response` costs an await
  and a timeout per reply, which under load was a large share of a node's CPU. It relies
  on redis-py having read nothing past the connection's handshake, true as long as only
  the `ReplyReader` reads after `connect()`.
- Key names put the part that scopes them (a user, a stream) in a Redis Cluster hash tag,
  `{...}`, escaped so that no user id can end the tag early: all keys of one user or one
  stream then share a slot, which multi-key scripts need on a cluster, and two different
  (user, name) pairs never spell the same key.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse

URL_SCHEMES: Final = ("redis://", "rediss://", "unix://")
DEFAULT_MAX_CONNECTIONS: Final = 32  # per client; callers beyond it wait for a connection
DEFAULT_POOL_TIMEOUT: Final = 10.0  # seconds to wait for a free connection, then fail
DEFAULT_SOCKET_TIMEOUT: Final = 5.0  # seconds for one command's reply
DEFAULT_CONNECT_TIMEOUT: Final = 5.0  # seconds to open a connection
READ_SIZE: Final = 256 * 1024  # bytes per read of a `ReplyReader`


def check_redis_url(url: str) -> str:
    """`url`, if it is one redis-py can connect to; else a `ValueError` that says the fix."""
    if not url.startswith(URL_SCHEMES):
        raise ValueError(
            "TOKENWIRE_REDIS_URL must start with redis://, rediss:// or unix:// "
            f"(got {url!r}); for example redis://127.0.0.1:6379/0"
        )
    return url


def redis_client(
    url: str,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    pool_timeout: float = DEFAULT_POOL_TIMEOUT,
) -> Redis:
    """A client on its own bounded pool; the client owns the pool (`aclose` closes both)."""
    check_redis_url(url)
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1 (got {max_connections})")
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        socket_timeout=DEFAULT_SOCKET_TIMEOUT,
        socket_connect_timeout=DEFAULT_CONNECT_TIMEOUT,
        socket_keepalive=True,
        protocol=2,
    )
    return Redis.from_pool(pool)


def key_tag(part: str) -> str:
    """`part` as a Redis Cluster hash tag: `{part}`, with `%`, `{` and `}` escaped."""
    escaped = part.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return f"{{{escaped}}}"


def ttl_ms(seconds: float) -> int:
    """A TTL in whole milliseconds, at least 1 (Redis refuses 0 and treats less as expired)."""
    return max(1, round(seconds * 1000))


class ReplyReader:
    """The replies arriving on an open redis-py connection (`await connection.connect()`
    done, nothing read since), parsed by hiredis with redis-py's error classes: an error
    reply is returned as its exception (`ResponseError`, `NoScriptError`, ...), not raised."""

    def __init__(self, connection: Any) -> None:
        self._stream: asyncio.StreamReader = connection._reader
        self._parser = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error
        )

    async def next(self) -> list[Any]:
        """Every whole reply of the next read (at least one). Raises redis-py's
        `ConnectionError` when Redis closed the connection, `OSError` when it failed."""
        while True:
            data = await self._stream.read(READ_SIZE)
            if not data:
                raise RedisConnectionError("Redis closed the connection")
            self._parser.feed(data)
            replies = []
            while (reply := self._parser.gets()) is not False:
                replies.append(reply)
            if replies:
                return replies
