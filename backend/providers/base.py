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

    async def aclose(self) -> None:
        """Release connections and other resources; the default has none."""
