from backend.broker.base import Broker, Event, StreamEnded, Subscription, UserMessage, user_channel
from backend.broker.memory import MemoryBroker

__all__ = [
    "Broker",
    "Event",
    "MemoryBroker",
    "StreamEnded",
    "Subscription",
    "UserMessage",
    "user_channel",
]
