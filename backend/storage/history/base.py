"""The conversation-history contract, shared by every backend.

History is what a user sees when they come back: per user, conversations and their
messages. A user message is stored when its `chat` is accepted (so `ack` means stored);
the assistant's answer when its stream ends, with `complete=False` when cut short.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import msgspec

DEFAULT_CONTEXT_MESSAGES = 20
DEFAULT_LIST_LIMIT = 100


class StoredMessage(msgspec.Struct, frozen=True):
    id: str
    conversation: str
    role: Literal["user", "assistant"]
    text: str
    complete: bool
    created: float


class ConversationSummary(msgspec.Struct, frozen=True):
    conversation: str
    title: str
    created: float
    updated: float


class History(ABC):
    """Contract: every method is scoped to `user`, another user's data is never visible;
    a message is keyed by (user, request id, role), and writes are idempotent per key."""

    @abstractmethod
    async def add_user_message(self, user: str, conversation: str, id: str, text: str) -> bool:
        """Store a user message; creates the conversation (title from the first text).
        Returns False, changing nothing, when (user, id) already has a user message."""

    @abstractmethod
    async def get_user_message(self, user: str, id: str) -> StoredMessage | None:
        """The user message stored under request id `id`, if any."""

    @abstractmethod
    async def save_assistant_message(
        self, user: str, conversation: str, id: str, text: str, complete: bool
    ) -> None:
        """Store (or replace) the answer to request `id`."""

    @abstractmethod
    async def list_conversations(
        self, user: str, limit: int = DEFAULT_LIST_LIMIT
    ) -> list[ConversationSummary]:
        """The user's conversations, most recently updated first."""

    @abstractmethod
    async def conversation(self, user: str, conversation: str) -> ConversationSummary | None:
        """One of the user's conversations, or None."""

    @abstractmethod
    async def messages(
        self, user: str, conversation: str, limit: int = 1000
    ) -> list[StoredMessage] | None:
        """The conversation's messages, oldest first (None if the user has no such one).
        A user message comes before its answer."""

    async def aclose(self) -> None:
        """Release files and connections."""
