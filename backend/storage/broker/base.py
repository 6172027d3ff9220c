"""The broker contract: live fan-out of stream events to every connection of a user.

Channels are per user (`user:<uid>`). The broker is only the fast path: delivery is at
most once, so receivers detect holes by `seq` and read them from the stream log.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import msgspec

from backend.protocol import MessageFrame, StreamEnd, TokenFrame


class StreamEnded(msgspec.Struct, frozen=True, tag="end", tag_field="type"):
    """A stream ended after token `seq`; `frame` is its `done` or `error`."""

    id: str
    seq: int
    frame: StreamEnd


class UserMessage(msgspec.Struct, frozen=True, tag="user_message", tag_field="type"):
    """A user message accepted on connection `origin`; the others show it."""

    origin: str
    frame: MessageFrame


class CancelRequest(msgspec.Struct, frozen=True, tag="cancel_request", tag_field="type"):
    """Sent on the channel of the node that runs the generation of (user, id)."""

    user: str
    id: str


Event = TokenFrame | StreamEnded | UserMessage | CancelRequest
Listener = Callable[[Event], None]


def user_channel(user: str) -> str:
    return f"user:{user}"


def node_channel(node: str) -> str:
    return f"node:{node}"


class Subscription(ABC):
    @abstractmethod
    async def close(self) -> None:
        """Stop delivery to this listener; idempotent."""


class Broker(ABC):
    """Contract: `publish` delivers the event at most once to every listener subscribed to
    the channel at that moment, in publish order per publisher. Listeners are called on
    the event loop and must not block or raise."""

    @abstractmethod
    async def publish(self, channel: str, event: Event) -> None: ...

    @abstractmethod
    async def subscribe(self, channel: str, listener: Listener) -> Subscription: ...

    @property
    def healthy(self) -> bool:
        """Whether delivery works now (for /readyz); an in-process broker always does."""
        return True

    @abstractmethod
    def subscriptions(self) -> int:
        """Listeners subscribed now (for metrics)."""

    async def aclose(self) -> None:
        """Release connections."""
