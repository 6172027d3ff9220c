"""Conversation history: the contract and its backends."""

from backend.storage.history.base import (
    DEFAULT_CONTEXT_MESSAGES,
    DEFAULT_LIST_LIMIT,
    ConversationSummary,
    History,
    StoredMessage,
)
from backend.storage.history.sqlite import SqliteHistory, conversation_title

__all__ = [
    "DEFAULT_CONTEXT_MESSAGES",
    "DEFAULT_LIST_LIMIT",
    "ConversationSummary",
    "History",
    "SqliteHistory",
    "StoredMessage",
    "conversation_title",
]
