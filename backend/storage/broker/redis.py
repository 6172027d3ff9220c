"""Broker on Redis Pub/Sub: the events of a user reach every node that holds one of the
user's connections.

One subscriber connection per broker (per process): a channel is SUBSCRIBEd once however
many local listeners it has, and UNSUBSCRIBEd when the last one leaves; the reader task
decodes each message once and calls the channel's listeners in subscription order.
Publishing goes through a separate bounded pool (see `backend.storage.redis_connection`).

Deliberate choices a reader might want to "fix":

- The subscriber is a bare redis-py `Connection`, not a `PubSub`: `PubSub` reconnects and
  resubscribes by itself inside any call, which would hide an outage from `healthy` and
  from the backoff. Here the reader task owns the connection: when it drops it marks the
  broker unhealthy, reconnects with backoff (`RECONNECT_MIN_DELAY` doubling to
  `RECONNECT_MAX_DELAY`) and resubscribes every channel; `healthy` is True again once Redis
  confirmed them all. Events published meanwhile are lost to this node (at most once):
  receivers find the hole by seq and read it from the stream log.
- A PING every `keepalive` seconds on the subscriber connection: a silently dead TCP peer
  would otherwise leave the reader waiting forever.
- `subscribe` returns once Redis confirmed the SUBSCRIBE (bounded by `SUBSCRIBE_TIMEOUT`),
  so an event published after it returns reaches the new listener, from any node; the first
  `subscribe` also waits for the reader's first connection attempt. While Redis is known to
  be unreachable it returns at once; the reconnect subscribes the channel.
- `publish` never raises for Redis errors: a lost publish is what "at most once" allows,
  and a generation must not fail because the fast path is down (the log has the token).
  Failures are logged and counted in `publish_failures`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Final

import msgspec
from redis.asyncio import Connection, Redis
from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError

from backend.storage.broker.base import Broker, Event, Listener, Subscription
from backend.storage.redis_connection import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_POOL_TIMEOUT,
    DEFAULT_SOCKET_TIMEOUT,
    ReplyReader,
    check_redis_url,
    redis_client,
)
from backend.storage.redis_pipeline import Pipeliner

log = logging.getLogger(__name__)

RECONNECT_MIN_DELAY: Final = 0.1
RECONNECT_MAX_DELAY: Final = 2.0
DEFAULT_KEEPALIVE: Final = 15.0  # seconds between PINGs on the subscriber connection
SUBSCRIBE_TIMEOUT: Final = 5.0  # seconds `subscribe` waits for Redis to confirm

_CONNECTION_ERRORS: Final = (RedisError, OSError)


class _RedisSubscription(Subscription):
    def __init__(self, broker: RedisBroker, channel: str, listener: Listener) -> None:
        self.broker, self.channel, self.listener = broker, channel, listener
        self.closed = False

    async def close(self) -> None:
        if self.closed:
            return
        # Set before any await: from now on the reader never calls this listener.
        self.closed = True
        await self.broker._remove(self)


class RedisBroker(Broker):
    """The `Broker` contract on Redis Pub/Sub. Use `async with` (or `open`/`aclose`); the
    reader also starts on the first `subscribe`."""

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        pool_timeout: float = DEFAULT_POOL_TIMEOUT,
        keepalive: float = DEFAULT_KEEPALIVE,
    ) -> None:
        check_redis_url(url)
        self.url = url
        self._redis: Redis = redis_client(
            url, max_connections=max_connections, pool_timeout=pool_timeout
        )
        # The subscriber connection's class (TCP, TLS or unix socket) and options, from the
        # URL as redis-py's pools read it.
        options: dict[str, Any] = dict(parse_url(url))
        self._subscriber_class: Any = options.pop("connection_class", Connection)
        self._subscriber_options = {
            **options,
            "socket_timeout": DEFAULT_SOCKET_TIMEOUT,  # writes; reads wait without a timeout
            "socket_connect_timeout": DEFAULT_CONNECT_TIMEOUT,
            "socket_keepalive": True,
            # RESP2: messages are plain replies. Under RESP3 they are push notifications,
            # which redis-py's parser also logs one by one (formatting each message).
            "protocol": 2,
        }
        self._keepalive = keepalive
        # Every publish of this process goes through one pipeliner: under load, the events
        # of many generations share a write instead of each paying for a round trip. (Token
        # events mostly go with their append instead: `RedisStreamLog.append_and_publish`.)
        self._publisher = Pipeliner(self._redis, name="redis broker publisher")
        self._encoder = msgspec.json.Encoder()
        self._decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)
        self._listeners: dict[str, list[_RedisSubscription]] = {}
        # State of the current subscriber connection; reset when it drops.
        self._connection: Any = None  # redis.asyncio.Connection (untyped in redis-py)
        self._subscribed: set[str] = set()  # SUBSCRIBE sent on this connection
        # One future per SUBSCRIBE sent, per channel, resolved by its confirmation (Redis
        # confirms in order).
        self._confirmations: dict[str, deque[asyncio.Future[None]]] = {}
        self._resubscribing = 0  # confirmations still due for the reconnect's SUBSCRIBE
        self._sync_lock = asyncio.Lock()  # orders SUBSCRIBE/UNSUBSCRIBE with the state
        self._healthy = False
        self._first_attempt = asyncio.Event()  # set once the reader tried to connect
        self._last_reply = 0.0  # loop time of the last reply on the subscriber connection
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self.publish_failures = 0

    @property
    def healthy(self) -> bool:
        """Whether the subscriber connection is up and every channel subscribed."""
        return self._healthy

    async def __aenter__(self) -> RedisBroker:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Start the reader (it connects in the background; see `healthy`)."""
        if self._closed:
            raise RuntimeError("RedisBroker is closed")
        if self._reader is None:
            self._reader = asyncio.create_task(self._run(), name="redis broker reader")

    async def aclose(self) -> None:
        """Stop the reader and close every connection; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        for subscriptions in self._listeners.values():
            for subscription in subscriptions:
                subscription.closed = True
        self._listeners.clear()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._publisher.aclose()
        await self._redis.aclose()

    # ---- the contract ------------------------------------------------------------------

    def encode(self, event: Event) -> bytes:
        """`event` as this broker's subscribers decode it (for a script that publishes)."""
        return self._encoder.encode(event)

    async def publish(self, channel: str, event: Event) -> None:
        if self._closed:
            # Like a publish that Redis lost; generations may end during shutdown.
            self.publish_failures += 1
            return
        try:
            await self._publisher.command("PUBLISH", channel, self._encoder.encode(event))
        except _CONNECTION_ERRORS as exc:
            self.publish_failures += 1
            log.warning("publish to %s lost: %s", channel, exc)

    async def subscribe(self, channel: str, listener: Listener) -> Subscription:
        await self.open()
        subscription = _RedisSubscription(self, channel, listener)
        self._listeners.setdefault(channel, []).append(subscription)
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                # Right after start the connection is on its way: wait for it rather than
                # miss the first events (once it has failed, the outage is known: no wait).
                await self._first_attempt.wait()
                confirmed = await self._sync(channel)
                if confirmed is not None:
                    await asyncio.shield(confirmed)
        except TimeoutError:
            log.warning("Redis did not confirm SUBSCRIBE %s in time", channel)
        return subscription

    def subscriptions(self) -> int:
        return sum(len(subscriptions) for subscriptions in self._listeners.values())

    # ---- subscriptions on Redis ----------------------------------------------------------

    async def _remove(self, subscription: _RedisSubscription) -> None:
        listeners = self._listeners.get(subscription.channel)
        if listeners is None or subscription not in listeners:
            return
        listeners.remove(subscription)
        if not listeners:
            del self._listeners[subscription.channel]
            await self._sync(subscription.channel)

    async def _sync(self, channel: str) -> asyncio.Future[None] | None:
        """Bring Redis in line with the local listeners of `channel`: SUBSCRIBE if it has
        some and is not subscribed, UNSUBSCRIBE if it has none and is. Returns the
        confirmation to wait for, if the channel is wanted and not yet confirmed."""
        async with self._sync_lock:
            connection = self._connection
            if connection is None or self._closed:
                return None  # the reader subscribes every wanted channel when it connects
            wanted = channel in self._listeners
            if wanted and channel not in self._subscribed:
                confirmed = self._expect_confirmation(channel)
                self._subscribed.add(channel)
                await self._send(connection, "SUBSCRIBE", channel)
                return confirmed
            if not wanted and channel in self._subscribed:
                self._subscribed.discard(channel)
                await self._send(connection, "UNSUBSCRIBE", channel)
                return None
            pending = self._confirmations.get(channel)
            return pending[-1] if wanted and pending else None

    def _expect_confirmation(self, channel: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(channel, deque()).append(future)
        return future

    @staticmethod
    async def _send(connection: Any, *command: str) -> None:
        try:
            await connection.send_command(*command, check_health=False)
        except _CONNECTION_ERRORS as exc:
            # The reader sees the same failure, reconnects and resubscribes.
            log.debug("%s failed: %s", command[0], exc)

    # ---- the reader ------------------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, serve until the connection fails, back off, again; until cancelled."""
        delay = RECONNECT_MIN_DELAY
        while True:
            try:
                connection = await self._connect()
            except _CONNECTION_ERRORS as exc:
                log.warning("Redis Pub/Sub unreachable, retrying in %.1f s: %s", delay, exc)
            except Exception:
                log.exception("Redis Pub/Sub connection failed, retrying in %.1f s", delay)
            else:
                self._first_attempt.set()
                delay = RECONNECT_MIN_DELAY
                await self._serve(connection)
            finally:
                self._first_attempt.set()  # also when the first attempt failed
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_DELAY)

    async def _serve(self, connection: Any) -> None:
        """Read and keep alive `connection` until it fails."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._read(connection))
                tasks.create_task(self._ping(connection))
        except* _CONNECTION_ERRORS as group:
            log.warning("Redis Pub/Sub connection lost: %s", group.exceptions[0])
        except* Exception:
            # A bug, not an outage: log it and carry on with a new connection.
            log.exception("Redis Pub/Sub reader failed")
        finally:
            self._drop(connection)
            await connection.disconnect(nowait=True)

    async def _connect(self) -> Any:
        connection = self._subscriber_class(**self._subscriber_options)
        try:
            await connection.connect()
            async with self._sync_lock:
                channels = list(self._listeners)
                self._connection = connection
                self._subscribed = set(channels)
                self._resubscribing = len(channels)
                for channel in channels:
                    self._expect_confirmation(channel)
                if channels:
                    await connection.send_command("SUBSCRIBE", *channels, check_health=False)
                else:
                    self._healthy = True
        except BaseException:
            self._drop(connection)
            await connection.disconnect(nowait=True)
            raise
        return connection

    def _drop(self, connection: Any) -> None:
        """Forget a connection that failed: nothing is subscribed any more, and whoever
        waits for a confirmation stops waiting (the next connection resubscribes)."""
        if self._connection is not connection:
            return
        self._healthy = False
        self._connection = None
        self._subscribed = set()
        self._resubscribing = 0
        for pending in self._confirmations.values():
            for future in pending:
                if not future.done():
                    future.set_result(None)
        self._confirmations.clear()

    async def _read(self, connection: Any) -> None:
        loop = asyncio.get_running_loop()
        replies = ReplyReader(connection)
        while True:
            # Without a timeout: a quiet channel is fine; `_ping` notices a dead peer.
            for reply in await replies.next():
                self._last_reply = loop.time()
                if not isinstance(reply, list) or len(reply) < 2:
                    continue  # PONG outside subscribed mode
                kind = reply[0]
                if kind == b"message":
                    self._dispatch(reply[1].decode(), reply[2])
                elif kind == b"subscribe":
                    self._confirmed(reply[1].decode())

    async def _ping(self, connection: Any) -> None:
        loop = asyncio.get_running_loop()
        self._last_reply = loop.time()
        while True:
            sent = loop.time()
            await connection.send_command("PING", check_health=False)
            await asyncio.sleep(self._keepalive)
            if self._last_reply < sent:
                raise ConnectionError(f"no reply from Redis in {self._keepalive} s")

    def _confirmed(self, channel: str) -> None:
        pending = self._confirmations.get(channel)
        if pending:
            future = pending.popleft()
            if not future.done():
                future.set_result(None)
            if not pending:
                del self._confirmations[channel]
        if self._resubscribing > 0:
            self._resubscribing -= 1
            if self._resubscribing == 0:
                self._healthy = True

    def _dispatch(self, channel: str, data: bytes) -> None:
        listeners = self._listeners.get(channel)
        if not listeners:
            return
        try:
            event = self._decoder.decode(data)
        except msgspec.DecodeError:
            log.warning("undecodable event on %s dropped", channel)
            return
        # Copy: a listener may close subscriptions while we iterate.
        for subscription in tuple(listeners):
            if subscription.closed:
                continue
            try:
                subscription.listener(event)
            except Exception:  # one broken listener must not starve the others
                log.exception("broker listener failed on %s", channel)
