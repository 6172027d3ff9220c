"""`LeanEvent`: an `asyncio.Event` that costs ~100 bytes instead of ~900.

`asyncio.Event` allocates a `collections.deque` for its waiters in `__init__`, and an
empty deque is 760 bytes. Every connection holds a few events that usually have one waiter
or none, so with tens of thousands of connections those deques were a measurable part of
a connection's memory (bench/idle.py). This subclass keeps the waiters in a list made on
the first `wait`, and is otherwise the same event (it overrides every method that touches
the waiters, so the base class's deque is never created).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal


class LeanEvent(asyncio.Event):
    def __init__(self) -> None:  # the base's __init__ would make the deque
        self._value = False
        self._lean_waiters: list[asyncio.Future[Any]] | None = None

    def __repr__(self) -> str:
        state = "set" if self._value else "unset"
        return f"<LeanEvent [{state}, waiters:{len(self._lean_waiters or ())}]>"

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if not self._value:
            self._value = True
            for future in self._lean_waiters or ():
                if not future.done():
                    future.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> Literal[True]:
        if self._value:
            return True
        future = asyncio.get_running_loop().create_future()
        if self._lean_waiters is None:
            self._lean_waiters = []
        self._lean_waiters.append(future)
        try:
            await future
            return True
        finally:
            self._lean_waiters.remove(future)
            if not self._lean_waiters:
                self._lean_waiters = None


class CallbackEvent(LeanEvent):
    """An event whose `set` also calls `callback` (when it was clear): for a consumer that
    is not a task waiting on it but a callback, such as a detached WebSocket's flush."""

    def __init__(self, callback: Callable[[], None]) -> None:
        super().__init__()
        self._callback = callback

    def set(self) -> None:
        if not self._value:
            super().set()
            self._callback()
