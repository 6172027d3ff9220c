from backend.storage.broker.base import (
    Broker,
    CancelRequest,
    Event,
    StreamEnded,
    Subscription,
    UserMessage,
    node_channel,
    user_channel,
)
from backend.storage.broker.memory import MemoryBroker

__all__ = [
    "Broker",
    "CancelRequest",
    "Event",
    "MemoryBroker",
    "StreamEnded",
    "Subscription",
    "UserMessage",
    "node_channel",
    "user_channel",
]
