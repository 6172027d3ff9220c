"""`Pipeliner`: the commands of many concurrent callers on one connection, written as they
come and answered in order (automatic pipelining).

Each awaited Redis command through redis-py costs a round trip and ~60 µs of client CPU
(FIELD-NOTES.md); pipelined by the hundred, ~11 µs. A generation per stream awaits its own
append, so under load hundreds of commands wait at once. The pipeliner writes every command
queued during one turn of the event loop in one write, without waiting for the replies of
earlier writes: Redis answers in order, so one reader matches each reply to its caller. A
command therefore waits one round trip, never for the batch before it to come back; a
quiet process pays one loop turn.

Contract: `command`/`script` return the command's reply, as Redis sent it (no redis-py
response callbacks: PING gives b"PONG"), or raise its error; commands of one caller run in
the order it awaited them (a caller awaits each before its next), and commands written
together run in the order they were queued. A cancelled caller's command may still run
(like a command whose reply was lost).

Deliberate choices a reader might want to "fix":

- The connection is opened by redis-py (a `Connection` of the client's pool class and
  options: TCP, TLS or unix socket, AUTH, SELECT, RESP2), then its stream writer and a
  `ReplyReader` are used directly: redis-py reads one reply per await under a timeout
  each, which costs more than a whole batch does here.
- One connection, outside the client's pool, opened on the first command and again on the
  first command after it failed. A failure (Redis gone, or no reply within
  `DEFAULT_SOCKET_TIMEOUT` while replies are due) fails every command in flight: none is
  retried, as a retried EVALSHA whose reply was lost would run a write twice.
- Writes are not awaited (no drain): the bound on what can pile up is the reply timeout,
  which drops the connection, and the callers, each awaiting one command.
- Scripts go as EVALSHA; if Redis does not know the script (it restarted empty), that
  command alone is sent again once the script is loaded. A script that Redis refused with
  NOSCRIPT did not run, so sending it again cannot apply it twice.
- Owned tasks: the reader of each connection and the connect in progress, cancelled and
  awaited by `aclose`; commands still waiting then fail with `ConnectionError`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import InvalidResponse, NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from backend.storage.redis_connection import DEFAULT_SOCKET_TIMEOUT, ReplyReader


class _Call:
    __slots__ = ("args", "future", "script")

    def __init__(
        self, args: tuple[Any, ...], future: asyncio.Future[Any], script: AsyncScript | None
    ) -> None:
        self.args = args
        self.future = future
        self.script = script


class _Link:
    """One open connection: its writer, its reader task, and the calls awaiting replies."""

    def __init__(self, connection: Any, reply_timeout: float) -> None:
        self.connection = connection  # redis.asyncio.Connection (untyped in redis-py)
        self.writer: asyncio.StreamWriter = connection._writer
        self.replies = ReplyReader(connection)
        self.in_flight: deque[_Call] = deque()
        self.reply_timeout = reply_timeout
        self.deadline: asyncio.Timeout | None = None  # the read's timeout, while one is due
        self.task: asyncio.Task[None] | None = None
        self.broken = False


class Pipeliner:
    def __init__(
        self, redis: Redis, *, name: str, reply_timeout: float = DEFAULT_SOCKET_TIMEOUT
    ) -> None:
        self._pool = redis.connection_pool
        self._name = name
        self._reply_timeout = reply_timeout
        self._link: _Link | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._queue: list[_Call] = []  # queued this loop turn, or while connecting
        self._flush_scheduled = False
        self._reloads: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches = 0  # writes made (for tests and benchmarks)

    async def command(self, *args: Any) -> Any:
        """Run one command (`"PUBLISH", channel, data`) in the next write."""
        return await self._queued(args, None)

    async def script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run a registered script in the next write."""
        return await self._queued(("EVALSHA", script.sha, len(keys), *keys, *args), script)

    def _queued(self, args: tuple[Any, ...], script: AsyncScript | None) -> asyncio.Future[Any]:
        if self._closed:
            raise ConnectionError(f"{self._name} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Call(args, future, script))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    async def aclose(self) -> None:
        """Stop the tasks and close the connection; commands not answered yet fail.
        Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        closed = ConnectionError(f"{self._name} closed")
        tasks = [*self._reloads]
        if self._connecting is not None:
            tasks.append(self._connecting)
        link, self._link = self._link, None
        if link is not None:
            self._drop(link, closed)
            if link.task is not None:
                tasks.append(link.task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if link is not None:
            await link.connection.disconnect()
        _fail(self._queue, closed)
        self._queue = []

    # ---- writing ---------------------------------------------------------------------

    def _flush(self) -> None:
        """Write what was queued during this loop turn (or start the connection first)."""
        self._flush_scheduled = False
        if not self._queue or self._closed:
            return
        link = self._link
        if link is None or link.broken:
            if self._connecting is None:
                self._connecting = asyncio.get_running_loop().create_task(
                    self._connect(), name=f"{self._name} connect"
                )
            return  # the connect flushes the queue when it is done
        calls, self._queue = self._queue, []
        packed = []
        was_idle = not link.in_flight
        for call in calls:
            if call.future.done():
                continue  # its caller was cancelled before it was written
            try:
                packed.append(hiredis.pack_command(call.args))
            except Exception as exc:  # an argument Redis cannot take: this caller's error
                call.future.set_exception(exc)
                continue
            link.in_flight.append(call)
        if not packed:
            return
        self.batches += 1
        if was_idle and link.deadline is not None:
            link.deadline.reschedule(asyncio.get_running_loop().time() + link.reply_timeout)
        link.writer.write(b"".join(packed))

    async def _connect(self) -> None:
        try:
            # redis.asyncio.Connection (or its TLS / unix socket class), untyped in redis-py
            connection: Any = self._pool.connection_class(**self._pool.connection_kwargs)
            await connection.connect()
        except Exception as exc:
            self._connecting = None
            calls, self._queue = self._queue, []
            _fail(calls, exc)
            return
        link = self._link = _Link(connection, self._reply_timeout)
        link.task = asyncio.get_running_loop().create_task(
            self._read(link), name=f"{self._name} reader"
        )
        self._connecting = None
        self._flush()

    # ---- reading ---------------------------------------------------------------------

    async def _read(self, link: _Link) -> None:
        """Match each reply to the oldest call in flight, until the connection fails."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                # No timeout while nothing is due; `_flush` sets one when it writes.
                when = loop.time() + link.reply_timeout if link.in_flight else None
                async with asyncio.timeout(when) as link.deadline:
                    replies = await link.replies.next()
                link.deadline = None
                for reply in replies:
                    if not link.in_flight:
                        raise InvalidResponse(f"{self._name}: a reply nobody asked for")
                    self._answer(link.in_flight.popleft(), reply)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            self._drop(link, RedisTimeoutError(f"{self._name}: no reply from Redis in time"))
        except Exception as exc:
            self._drop(link, exc)
        await link.connection.disconnect(nowait=True)

    def _answer(self, call: _Call, reply: Any) -> None:
        if call.future.done():
            return  # its caller was cancelled
        if isinstance(reply, NoScriptError) and call.script is not None:
            task = asyncio.get_running_loop().create_task(self._reload(call, call.script))
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)
        elif isinstance(reply, Exception):
            call.future.set_exception(reply)
        else:
            call.future.set_result(reply)

    async def _reload(self, call: _Call, script: AsyncScript) -> None:
        """Redis lost a script (it restarted empty): load it, then run the command again.
        Refused with NOSCRIPT, it did not run."""
        try:
            script.sha = (await self.command("SCRIPT", "LOAD", script.script)).decode()
            reply = await self._queued(("EVALSHA", script.sha, *call.args[2:]), script)
        except Exception as exc:
            if not call.future.done():
                call.future.set_exception(exc)
            return
        if not call.future.done():
            call.future.set_result(reply)

    def _drop(self, link: _Link, exc: BaseException) -> None:
        """The connection failed (or is closing): every call in flight fails with `exc`."""
        link.broken = True
        calls = list(link.in_flight)
        link.in_flight.clear()
        _fail(calls, exc)
        if link is self._link:
            self._link = None


def _fail(calls: Sequence[_Call], exc: BaseException) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(exc)
