"""Request-id claims: the first `chat` with an id starts a generation, repeats replay it.

A claim records a fingerprint of (conversation, text) under (user, id). Claims are bounded
in number and time; the durable check behind them is the history, which refuses a second
user message with the same id even after a restart.
"""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum
from typing import Final

DEFAULT_CLAIM_TTL: Final = 24 * 3600.0
DEFAULT_MAX_CLAIMS: Final = 200_000


class Claim(Enum):
    NEW = "new"  # first time: the caller generates
    SAME = "same"  # a repeat with the same content: the caller replays
    CONFLICT = "conflict"  # the id was used for other content


def fingerprint(conversation: str, text: str) -> str:
    return hashlib.sha256(f"{conversation}\0{text}".encode()).hexdigest()


class RequestRegistry(ABC):
    """Contract: `claim` is atomic: of concurrent claims of one (user, id), exactly one is
    NEW. A claim is remembered at least `ttl` seconds unless the bound evicts it first."""

    @abstractmethod
    async def claim(self, user: str, id: str, fingerprint: str) -> Claim: ...

    @abstractmethod
    async def known(self, user: str, id: str) -> bool:
        """Whether (user, id) was claimed and is still remembered."""

    async def aclose(self) -> None:
        """Release what the registry holds; calling it again does nothing."""


class MemoryRequestRegistry(RequestRegistry):
    def __init__(
        self,
        ttl: float = DEFAULT_CLAIM_TTL,
        max_claims: int = DEFAULT_MAX_CLAIMS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl, self._max, self._clock = ttl, max_claims, clock
        # Insertion order is expiry order, since every claim lives `ttl`.
        self._claims: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    async def claim(self, user: str, id: str, fingerprint: str) -> Claim:
        self._expire()
        existing = self._claims.get((user, id))
        if existing is not None:
            return Claim.SAME if existing[0] == fingerprint else Claim.CONFLICT
        self._claims[(user, id)] = (fingerprint, self._clock() + self._ttl)
        if len(self._claims) > self._max:
            self._claims.popitem(last=False)
        return Claim.NEW

    async def known(self, user: str, id: str) -> bool:
        self._expire()
        return (user, id) in self._claims

    def _expire(self) -> None:
        now = self._clock()
        while self._claims:
            key, (_, expires) = next(iter(self._claims.items()))
            if expires > now:
                break
            del self._claims[key]
