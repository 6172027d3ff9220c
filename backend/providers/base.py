"""The provider contract: a source of tokens for one answer.

A provider turns a conversation into an async stream of text tokens. It never sees a
client: the chat service appends what it yields to the stream log.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence

import msgspec

from backend.protocol import ChatTurn, DoneReason


class Finish(msgspec.Struct, frozen=True):
    """Yielded last, when the provider states why it stopped (default: "stop")."""

    reason: DoneReason


class ProviderError(Exception):
    """The provider failed. `str(exc)` is safe to show a user: no secrets, no raw bodies."""


class Provider(ABC):
    """Produces the answer to `turns` (oldest first, the new user message last).

    Contract: `stream` yields non-empty `str` tokens in order, then optionally one `Finish`;
    it raises `ProviderError` for every failure of the model or its transport (never another
    exception type for those); it stops promptly when the consuming task is cancelled.
    """

    name: str

    @abstractmethod
    def stream(self, turns: Sequence[ChatTurn]) -> AsyncIterator[str | Finish]: ...

    def batches(self, turns: Sequence[ChatTurn]) -> AsyncIterator[list[str] | Finish]:
        """The tokens of `stream`, grouped: each list (never empty) holds the tokens that
        were ready at the same moment (one network read, a paced model's overdue tokens).

        The chat service appends and publishes each list at once, so a provider that hands
        over several tokens together costs one log append and one broker event for them.
        Same contract as `stream` otherwise. The default makes one list per token.
        """
        return _one_by_one(self.stream(turns))

    async def aclose(self) -> None:
        """Release connections and other resources; the default has none."""


async def _one_by_one(stream: AsyncIterator[str | Finish]) -> AsyncIterator[list[str] | Finish]:
    async for item in stream:
        yield item if isinstance(item, Finish) else [item]
