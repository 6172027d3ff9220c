"""`Pipeliner`: the commands of many concurrent callers, sent together, one round trip for
each batch (group commit).

Each awaited Redis command costs a round trip and ~60 µs of client CPU (FIELD-NOTES.md);
pipelined by the hundred, ~11 µs. A generation per stream awaits its own append and
publish, so under load hundreds of them wait at once: the pipeliner's one task sends
whatever was queued while the previous batch was on the wire. A quiet process pays one
task switch: the first command wakes the task at once.

Contract: `call` returns the command's reply or raises its error, as if it had been sent
alone; commands of one caller run in the order it awaited them (a caller awaits each
before its next), and the commands of a batch run in the order they were queued. A
cancelled caller's command may still run (like a command whose reply was lost).

Deliberate choices a reader might want to "fix":

- One connection for the pipelines, taken from the client's bounded pool for each batch:
  a thousand callers never open a thousand connections (FIELD-NOTES.md's pool trap).
- Scripts go as EVALSHA; if Redis does not know the script (it restarted empty), that
  command alone is sent again by redis-py's `Script`, which loads it first. A script that
  Redis refused with NOSCRIPT did not run, so sending it again cannot apply it twice.
- Owned task: started on the first `call`, cancelled and awaited by `aclose`; commands
  still queued then fail with `ConnectionError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

DEFAULT_MAX_BATCH: Final = 512  # commands per round trip; the rest go in the next one


class _Call:
    __slots__ = ("args", "future", "script")

    def __init__(
        self, args: tuple[Any, ...], future: asyncio.Future[Any], script: AsyncScript | None
    ) -> None:
        self.args = args
        self.future = future
        self.script = script


class Pipeliner:
    def __init__(self, redis: Redis, *, max_batch: int = DEFAULT_MAX_BATCH, name: str) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._name = name
        self._queue: list[_Call] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.batches = 0  # round trips made (for tests and benchmarks)

    async def command(self, *args: Any) -> Any:
        """Run one command (`"PUBLISH", channel, data`) in the next batch."""
        return await self._queued(args, None)

    async def script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run a registered script in the next batch."""
        return await self._queued(("EVALSHA", script.sha, len(keys), *keys, *args), script)

    def _queued(self, args: tuple[Any, ...], script: AsyncScript | None) -> asyncio.Future[Any]:
        if self._closed:
            raise ConnectionError(f"{self._name} is closed")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = loop.create_task(self._run(), name=self._name)
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Call(args, future, script))
        self._wake.set()
        return future

    async def aclose(self) -> None:
        """Stop the task; commands not sent yet fail. Calling it again does nothing."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail(self._queue, ConnectionError(f"{self._name} closed"))
        self._queue = []

    async def _run(self) -> None:
        calls: list[_Call] = []
        try:
            while True:
                if not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                calls = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._send(calls)
                calls = []
        finally:
            # Cancelled (closing) with a batch on the wire: its callers must not wait on.
            self._fail(calls, ConnectionError(f"{self._name} closed"))

    async def _send(self, calls: list[_Call]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(*call.args)
        self.batches += 1
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection failed: every command of the batch did
            self._fail(calls, exc)
            return
        unknown: list[_Call] = []
        for call, reply in zip(calls, replies, strict=True):
            if call.future.done():
                continue  # its caller was cancelled
            if isinstance(reply, NoScriptError) and call.script is not None:
                unknown.append(call)
            elif isinstance(reply, Exception):
                call.future.set_exception(reply)
            else:
                call.future.set_result(reply)
        if unknown:
            await self._reload(unknown)

    async def _reload(self, calls: list[_Call]) -> None:
        """Redis lost scripts (it restarted empty): load them, then send those commands
        first in the next batch. Refused with NOSCRIPT, they did not run."""
        try:
            for script in {id(call.script): call.script for call in calls}.values():
                assert script is not None
                script.sha = await self._redis.script_load(script.script)
        except Exception as exc:
            self._fail(calls, exc)
            return
        for call in calls:
            assert call.script is not None
            call.args = ("EVALSHA", call.script.sha, *call.args[2:])
        self._queue[:0] = calls

    @staticmethod
    def _fail(calls: list[_Call], exc: BaseException) -> None:
        for call in calls:
            if not call.future.done():
                call.future.set_exception(exc)
