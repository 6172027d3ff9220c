"""Stream log on Redis Streams: every node of a deployment reads the same logs.

Key layout, for a stream `key` (`{key}` is the escaped hash tag of
`backend.storage.redis_connection`):

- `tw:log:{key}`: a Redis stream. Token `seq` is the entry with id `<seq>-0` and one field
  `t` (the token). Entry `0-1` is the stream's header: it exists from `create` on, so an
  empty stream is still a key, and its field `g` holds the stream's generation (a random id
  per `create`). So the last seq is `XLEN - 1`, and `read_after(after)` is an XRANGE from
  `<after + 1>-0`, which never includes the header.
- `tw:end:{key}`: the msgspec-encoded `StreamEnd`, written by `finish`. Absent while the
  stream runs.

Every operation is one Lua script (one round trip, atomic), so an `append` can never land
after a `finish`, and a read never sees an end without the tokens before it. All of an
instance's scripts go in order on one pipelined connection: a read or a `finish` runs after
every append issued before it, also one whose caller was cancelled while it was on the
wire (the chat service reads such an append back when it ends the stream).

Deliberate choices a reader might want to "fix":

- No `XADD MAXLEN`: trimming would punch holes in the seqs. The bound is `StreamFull`,
  checked in the append script before anything is written.
- A running stream expires `running_ttl` (a day by default) after its last append, so a
  producer that crashed cannot leak keys; `finish` then sets the real `ttl` on both keys,
  with one absolute deadline so that they vanish together.
- Fencing without a contract change: `create` remembers, in this instance, the stream's
  generation and the last seq it knows. An append from this instance carries both, and the
  script refuses it (`StreamExpired`) if the stream was re-created meanwhile (a new
  generation, e.g. after Redis lost its data and another node started the same request)
  or if its last seq is not the one expected (another writer appended, or an earlier
  append's reply was lost after it was applied). An instance that never created the key
  appends unfenced, as the contract allows.
- `append_and_publish` with a `RedisBroker` on the same Redis publishes from the append's
  script, after the tokens are in: one round trip per batch of tokens instead of two, and
  the event can never announce tokens the log refused. It needs the seq in the event
  before the script runs, so only fenced appends (streams this instance created, whose
  next seq it knows) go this way; the others append, then publish.
- `len()` counts the streams this instance created that have not expired by its own clock
  (there is no cheap exact count of one prefix in Redis, and metrics are per node anyway).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from redis.asyncio import Redis

from backend.protocol import StreamEnd
from backend.storage.broker.base import Broker, Event
from backend.storage.broker.redis import RedisBroker
from backend.storage.redis_connection import DEFAULT_MAX_CONNECTIONS, key_tag, redis_client, ttl_ms
from backend.storage.redis_pipeline import Pipeliner
from backend.storage.streams.base import (
    DEFAULT_READ_LIMIT,
    StreamExpired,
    StreamFull,
    StreamLog,
    StreamSlice,
)

DEFAULT_RUNNING_TTL: Final = 24 * 3600.0  # a running stream with no append for this long goes
SWEEP_INTERVAL: Final = 60.0  # seconds between sweeps of this instance's expired entries

# Return codes of the scripts (Lua numbers).
_EXPIRED: Final = -1
_FULL: Final = -2

# KEYS: log, end. ARGV: generation, running ttl (ms).
# Returns {generation, last seq} of the running stream it keeps or the one it starts.
_CREATE: Final = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  local header = redis.call('XRANGE', KEYS[1], '0-1', '0-1')
  if header[1] then
    return {header[1][2][2], redis.call('XLEN', KEYS[1]) - 1}
  end
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('XADD', KEYS[1], '0-1', 'g', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {ARGV[1], 0}
"""

# KEYS: log, end. ARGV: generation ('' = unfenced), expected last seq (-1 = unfenced),
# max tokens, running ttl (ms), channel ('' = none), message, tokens...
# Returns the new last seq, -1 if the stream is unknown, ended or fenced off, -2 if full.
# Publishes `message` on `channel` once the tokens are in, and only then.
_APPEND: Final = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local n = redis.call('XLEN', KEYS[1])
if n == 0 then return -1 end
if ARGV[1] ~= '' then
  local header = redis.call('XRANGE', KEYS[1], '0-1', '0-1')
  if not header[1] or header[1][2][2] ~= ARGV[1] then return -1 end
end
local last = n - 1
local expected = tonumber(ARGV[2])
if expected >= 0 and expected ~= last then return -1 end
local count = #ARGV - 6
if last + count > tonumber(ARGV[3]) then return -2 end
for i = 1, count do
  redis.call('XADD', KEYS[1], (last + i) .. '-0', 't', ARGV[6 + i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return last + count
"""

# KEYS: log, end. ARGV: generation ('' = unfenced), encoded end, ttl (ms).
# Returns 1, or -1 if the stream is unknown or fenced off.
_FINISH: Final = """
if redis.call('XLEN', KEYS[1]) == 0 then return -1 end
if ARGV[1] ~= '' then
  local header = redis.call('XRANGE', KEYS[1], '0-1', '0-1')
  if not header[1] or header[1][2][2] ~= ARGV[1] then return -1 end
end
local now = redis.call('TIME')
local deadline = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + ARGV[3]
redis.call('SET', KEYS[2], ARGV[2], 'PXAT', deadline)
redis.call('PEXPIREAT', KEYS[1], deadline)
return 1
"""

# KEYS: log, end. ARGV: first seq to read, limit.
# Returns nil if the stream is unknown, else {last seq, encoded end or nil, tokens}.
_READ: Final = """
local n = redis.call('XLEN', KEYS[1])
if n == 0 then return nil end
local tokens = {}
if tonumber(ARGV[2]) > 0 then
  local entries = redis.call('XRANGE', KEYS[1], ARGV[1] .. '-0', '+', 'COUNT', ARGV[2])
  for i, entry in ipairs(entries) do tokens[i] = entry[2][2] end
end
return {n - 1, redis.call('GET', KEYS[2]), tokens}
"""


def log_key(key: str) -> str:
    return f"tw:log:{key_tag(key)}"


def end_key(key: str) -> str:
    return f"tw:end:{key_tag(key)}"


@dataclass(eq=False)
class _Created:
    """What this instance knows of a stream it created."""

    generation: str
    last_seq: int
    expires: float  # by this instance's clock


class RedisStreamLog(StreamLog):
    """The `StreamLog` contract on Redis Streams (see the module docstring for the layout)."""

    def __init__(
        self,
        url: str,
        max_tokens: int,
        *,
        running_ttl: float = DEFAULT_RUNNING_TTL,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._redis: Redis = redis_client(url, max_connections=max_connections)
        self._max_tokens = max_tokens
        self._running_ttl = running_ttl
        self._clock = clock
        self._create = self._redis.register_script(_CREATE)
        self._append = self._redis.register_script(_APPEND)
        self._finish = self._redis.register_script(_FINISH)
        self._read = self._redis.register_script(_READ)
        # Appends are the hot path (one per batch of tokens of every running stream): the
        # appends of many streams share a write. Every other script goes the same way, so
        # they run in the order they were issued.
        self._scripts = Pipeliner(self._redis, name="redis stream log")
        self._encoder = msgspec.json.Encoder()
        self._end_decoder: msgspec.json.Decoder[StreamEnd] = msgspec.json.Decoder(StreamEnd)
        self._created: dict[str, _Created] = {}
        self._next_sweep = clock() + SWEEP_INTERVAL
        self._closed = False

    def __len__(self) -> int:
        now = self._clock()
        return sum(1 for created in self._created.values() if created.expires > now)

    async def aclose(self) -> None:
        """Close the connections; calling it again does nothing."""
        if not self._closed:
            self._closed = True
            await self._scripts.aclose()
            await self._redis.aclose()

    async def create(self, key: str) -> None:
        self._sweep()
        generation, last_seq = await self._scripts.script(
            self._create,
            keys=[log_key(key), end_key(key)],
            args=[secrets.token_hex(8), ttl_ms(self._running_ttl)],
        )
        self._created[key] = _Created(
            generation=_text(generation),
            last_seq=int(last_seq),
            expires=self._clock() + self._running_ttl,
        )

    async def append(self, key: str, tokens: Sequence[str]) -> int:
        return await self._appended(key, tokens, self._created.get(key), "", b"")

    async def append_and_publish(
        self,
        key: str,
        tokens: Sequence[str],
        broker: Broker,
        channel: str,
        event: Callable[[int], Event],
    ) -> int:
        created = self._created.get(key)
        if created is None or not (isinstance(broker, RedisBroker) and broker.url == self.url):
            return await super().append_and_publish(key, tokens, broker, channel, event)
        # Fenced: the script refuses the append unless the stream's last seq is the one
        # known here, so when it publishes, the event's seq is this one.
        message = broker.encode(event(created.last_seq + len(tokens)))
        return await self._appended(key, tokens, created, channel, message)

    async def _appended(
        self,
        key: str,
        tokens: Sequence[str],
        created: _Created | None,
        channel: str,
        message: bytes,
    ) -> int:
        fence: list[Any] = ["", -1] if created is None else [created.generation, created.last_seq]
        last_seq = int(
            await self._scripts.script(
                self._append,
                keys=[log_key(key), end_key(key)],
                args=[
                    *fence,
                    self._max_tokens,
                    ttl_ms(self._running_ttl),
                    channel,
                    message,
                    *tokens,
                ],
            )
        )
        if last_seq == _EXPIRED:
            raise StreamExpired(key)
        if last_seq == _FULL:
            raise StreamFull(key)
        if created is not None:
            created.last_seq = last_seq
            created.expires = self._clock() + self._running_ttl
        return last_seq

    async def finish(self, key: str, end: StreamEnd, ttl: float) -> None:
        created = self._created.get(key)
        generation = "" if created is None else created.generation
        result = await self._scripts.script(
            self._finish,
            keys=[log_key(key), end_key(key)],
            args=[generation, self._encoder.encode(end), ttl_ms(ttl)],
        )
        if int(result) == _EXPIRED:
            raise StreamExpired(key)
        if created is not None:
            created.expires = self._clock() + ttl

    async def read_after(
        self, key: str, after: int, limit: int = DEFAULT_READ_LIMIT
    ) -> StreamSlice:
        after = max(after, 0)
        reply = await self._scripts.script(
            self._read, keys=[log_key(key), end_key(key)], args=[after + 1, max(limit, 0)]
        )
        if reply is None:
            raise StreamExpired(key)
        last_seq, encoded_end, raw_tokens = reply
        last_seq = int(last_seq)
        tokens = [_text(token) for token in raw_tokens]
        reached_end = after + len(tokens) >= last_seq
        end = None
        if reached_end and encoded_end is not None:
            end = self._end_decoder.decode(encoded_end)
        return StreamSlice(tokens=tokens, end=end, last_seq=last_seq)

    def _sweep(self) -> None:
        """Forget streams expired by this instance's clock, at most once a `SWEEP_INTERVAL`
        (a full scan: cheap at that pace, and simpler than an expiry-ordered index)."""
        now = self._clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL
        for key in [key for key, created in self._created.items() if created.expires <= now]:
            del self._created[key]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
