"""Conversation history in Redis (the `History` contract), shared by every node.

Key layout, per user (`{user}` is the escaped hash tag of
`backend.storage.redis_connection`, so all of a user's keys share one Redis Cluster slot):

- `tw:convs:{user}`: sorted set, conversation id -> updated (microseconds).
- `tw:conv:{user}:<conversation>`: hash `title`, `created` (microseconds), `turns` (the
  conversation's turn counter).
- `tw:msgs:{user}:<conversation>`: sorted set of the conversation's messages, member
  `u:<id>` (the user message of request `id`) or `a:<id>` (its answer), score
  `2 * turn` for a user message and `2 * turn + 1` for an answer.
- `tw:msg:{user}:u:<id>`, `tw:msg:{user}:a:<id>`: hash `conversation`, `text`, `complete`,
  `created` (microseconds) of one message.

Deliberate choices a reader might want to "fix":

- Every write is one Lua script, so it is atomic (concurrent duplicates store one) and
  costs one round trip. The read scripts build the keys of a conversation's messages from
  a prefix passed in ARGV: those keys are not in KEYS, but they share the user's hash tag,
  so they live in the same slot as the keys that are.
- Ordering follows the SQLite backend: a user message takes its conversation's next turn
  and its answer shares that turn, one score higher; an answer saved again keeps its score.
- Timestamps come from the Redis server's clock (`TIME`), in integer microseconds (exact in
  a sorted-set score), and never repeat or go backwards for one user: a write takes
  max(now, the user's latest `updated` + 1 µs). So "most recently updated first" follows
  the order of the writes even when they come from nodes with skewed clocks.
- Titles follow the SQLite rule (`conversation_title`): set by the first user message,
  filled later only while blank.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from redis.asyncio import Redis

from backend.storage.history.base import (
    DEFAULT_LIST_LIMIT,
    ConversationSummary,
    History,
    StoredMessage,
)
from backend.storage.history.sqlite import conversation_title
from backend.storage.redis_connection import DEFAULT_MAX_CONNECTIONS, key_tag, redis_client

# Shared head of the write scripts. KEYS[1] is the user's conversations, KEYS[2] the
# conversation's hash; ARGV[1] the conversation id.
_PRELUDE: Final = """
local function now_us()
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local latest = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if latest[2] and tonumber(latest[2]) >= now then now = tonumber(latest[2]) + 1 end
  return now
end
local function touch(title, now)
  local current = redis.call('HGET', KEYS[2], 'title')
  if not current or current == '' then redis.call('HSET', KEYS[2], 'title', title) end
  redis.call('HSETNX', KEYS[2], 'created', now)
  redis.call('ZADD', KEYS[1], now, ARGV[1])
end
"""

# KEYS: convs, conv, msgs, user message. ARGV: conversation, id, text, title.
# Returns 1 if stored, 0 if the user already has a user message with this id.
_ADD_USER_MESSAGE: Final = (
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local now = now_us()
touch(ARGV[4], now)
local turn = redis.call('HINCRBY', KEYS[2], 'turns', 1)
redis.call('HSET', KEYS[4], 'conversation', ARGV[1], 'text', ARGV[3], 'complete', 1,
  'created', now)
redis.call('ZADD', KEYS[3], 2 * turn, 'u:' .. ARGV[2])
return 1
"""
)

# KEYS: convs, conv, msgs, answer. ARGV: conversation, id, text, complete (0/1), the
# prefix of the user's `msgs` keys (to move an answer saved before in another conversation).
_SAVE_ASSISTANT_MESSAGE: Final = (
    _PRELUDE
    + """
local now = now_us()
touch('', now)
local member = 'a:' .. ARGV[2]
local previous = redis.call('HGET', KEYS[4], 'conversation')
if previous and previous ~= ARGV[1] then
  redis.call('ZREM', ARGV[5] .. previous, member)
end
local score = redis.call('ZSCORE', KEYS[3], 'u:' .. ARGV[2])
if score then
  score = tonumber(score) + 1
else
  score = redis.call('ZSCORE', KEYS[3], member)
  if not score then score = 2 * redis.call('HINCRBY', KEYS[2], 'turns', 1) + 1 end
end
redis.call('HSET', KEYS[4], 'conversation', ARGV[1], 'text', ARGV[3], 'complete', ARGV[4],
  'created', now)
redis.call('ZADD', KEYS[3], score, member)
return 1
"""
)

# KEYS: convs. ARGV: limit, the prefix of the user's `conv` keys.
# Returns {{id, title, created, updated}, ...}, most recently updated first.
_LIST_CONVERSATIONS: Final = """
local out = {}
if tonumber(ARGV[1]) <= 0 then return out end
local rows = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
for i = 1, #rows, 2 do
  local meta = redis.call('HMGET', ARGV[2] .. rows[i], 'title', 'created')
  out[#out + 1] = {rows[i], meta[1], meta[2], rows[i + 1]}
end
return out
"""

# KEYS: conv, msgs. ARGV: limit, the prefix of the user's `msg` keys.
# Returns nil if there is no such conversation, else the last `limit` messages, oldest
# first, as {{member, conversation, text, complete, created}, ...}.
_MESSAGES: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
local out = {}
if tonumber(ARGV[1]) <= 0 then return out end
local members = redis.call('ZREVRANGE', KEYS[2], 0, tonumber(ARGV[1]) - 1)
for i = #members, 1, -1 do
  local m = members[i]
  local f = redis.call('HMGET', ARGV[2] .. m, 'conversation', 'text', 'complete', 'created')
  out[#out + 1] = {m, f[1], f[2], f[3], f[4]}
end
return out
"""


class _Keys:
    """The key names of one user's history."""

    def __init__(self, user: str) -> None:
        tag = key_tag(user)
        self.convs = f"tw:convs:{tag}"
        self.conv_prefix = f"tw:conv:{tag}:"
        self.msgs_prefix = f"tw:msgs:{tag}:"
        self.msg_prefix = f"tw:msg:{tag}:"

    def conv(self, conversation: str) -> str:
        return self.conv_prefix + conversation

    def msgs(self, conversation: str) -> str:
        return self.msgs_prefix + conversation

    def user_message(self, id: str) -> str:
        return f"{self.msg_prefix}u:{id}"

    def answer(self, id: str) -> str:
        return f"{self.msg_prefix}a:{id}"


class RedisHistory(History):
    """The `History` contract in Redis (see the module docstring for the layout)."""

    def __init__(self, url: str, *, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self._redis: Redis = redis_client(url, max_connections=max_connections)
        self._add_user_message = self._redis.register_script(_ADD_USER_MESSAGE)
        self._save_assistant_message = self._redis.register_script(_SAVE_ASSISTANT_MESSAGE)
        self._list_conversations = self._redis.register_script(_LIST_CONVERSATIONS)
        self._messages = self._redis.register_script(_MESSAGES)
        self._closed = False

    async def aclose(self) -> None:
        """Close the connections; calling it again does nothing."""
        if not self._closed:
            self._closed = True
            await self._redis.aclose()

    async def add_user_message(self, user: str, conversation: str, id: str, text: str) -> bool:
        keys = _Keys(user)
        stored = await self._add_user_message(
            keys=[
                keys.convs,
                keys.conv(conversation),
                keys.msgs(conversation),
                keys.user_message(id),
            ],
            args=[conversation, id, text, conversation_title(text)],
        )
        return int(stored) == 1

    async def get_user_message(self, user: str, id: str) -> StoredMessage | None:
        fields = await self._redis.hmget(
            _Keys(user).user_message(id), ["conversation", "text", "complete", "created"]
        )
        conversation, text, complete, created = fields
        if conversation is None:
            return None
        return _message(id, "user", conversation, text, complete, created)

    async def save_assistant_message(
        self, user: str, conversation: str, id: str, text: str, complete: bool
    ) -> None:
        keys = _Keys(user)
        await self._save_assistant_message(
            keys=[keys.convs, keys.conv(conversation), keys.msgs(conversation), keys.answer(id)],
            args=[conversation, id, text, int(complete), keys.msgs_prefix],
        )

    async def list_conversations(
        self, user: str, limit: int = DEFAULT_LIST_LIMIT
    ) -> list[ConversationSummary]:
        if limit < 0:
            raise ValueError(f"limit must be >= 0 (got {limit})")
        keys = _Keys(user)
        rows = await self._list_conversations(keys=[keys.convs], args=[limit, keys.conv_prefix])
        return [
            ConversationSummary(
                conversation=_text(id_),
                title=_text(title or b""),
                created=_seconds(created or updated),
                updated=_seconds(updated),
            )
            for id_, title, created, updated in rows
        ]

    async def conversation(self, user: str, conversation: str) -> ConversationSummary | None:
        keys = _Keys(user)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hmget(keys.conv(conversation), ["title", "created"])
            pipe.zscore(keys.convs, conversation)
            (title, created), updated = await pipe.execute()
        if created is None or updated is None:
            return None
        return ConversationSummary(
            conversation=conversation,
            title=_text(title or b""),
            created=_seconds(created),
            updated=_seconds(updated),
        )

    async def messages(
        self, user: str, conversation: str, limit: int = 1000
    ) -> list[StoredMessage] | None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0 (got {limit})")
        keys = _Keys(user)
        rows = await self._messages(
            keys=[keys.conv(conversation), keys.msgs(conversation)],
            args=[limit, keys.msg_prefix],
        )
        if rows is None:
            return None
        messages = []
        for member, conv, text, complete, created in rows:
            role, _, id_ = _text(member).partition(":")
            messages.append(
                _message(id_, "user" if role == "u" else "assistant", conv, text, complete, created)
            )
        return messages


def _message(
    id: str,
    role: Literal["user", "assistant"],
    conversation: Any,
    text: Any,
    complete: Any,
    created: Any,
) -> StoredMessage:
    return StoredMessage(
        id=id,
        conversation=_text(conversation),
        role=role,
        text=_text(text),
        complete=int(complete) == 1,
        created=_seconds(created),
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _seconds(microseconds: bytes | str | float) -> float:
    """Seconds from the integer microseconds that the scripts store (as a score or a field);
    the same input always gives the same float, so `created == updated` can hold."""
    return int(float(microseconds)) / 1_000_000
