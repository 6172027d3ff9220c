"""In-process broker: publish calls each listener directly. The single-node default."""

from __future__ import annotations

import logging

from backend.storage.broker.base import Broker, Event, Listener, Subscription

log = logging.getLogger(__name__)


class _MemorySubscription(Subscription):
    def __init__(self, broker: MemoryBroker, channel: str, listener: Listener) -> None:
        self._broker, self._channel, self._listener = broker, channel, listener

    async def close(self) -> None:
        self._broker._remove(self._channel, self._listener)


class MemoryBroker(Broker):
    def __init__(self) -> None:
        self._channels: dict[str, list[Listener]] = {}

    async def publish(self, channel: str, event: Event) -> None:
        # Copy: a listener may unsubscribe (close its connection) while we iterate.
        for listener in tuple(self._channels.get(channel, ())):
            try:
                listener(event)
            except Exception:  # one broken listener must not starve the others
                log.exception("broker listener failed on %s", channel)

    async def subscribe(self, channel: str, listener: Listener) -> Subscription:
        self._channels.setdefault(channel, []).append(listener)
        return _MemorySubscription(self, channel, listener)

    def subscriptions(self) -> int:
        return sum(len(v) for v in self._channels.values())

    def _remove(self, channel: str, listener: Listener) -> None:
        listeners = self._channels.get(channel)
        if listeners and listener in listeners:
            listeners.remove(listener)
            if not listeners:
                del self._channels[channel]
