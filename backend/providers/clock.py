"""The clock model: the demo model's pacing, with each token's text its production time.

Each token is the wall-clock time at which the provider yields it, in integer microseconds
since the epoch, followed by a space (`"1764120000123456 "`). A client that receives the
token subtracts that from its own clock: the difference is the latency the server adds
between "the model produced a token" and "the client has it". It exists for the benchmarks
(bench/latency.py, bench/throughput.py); the text is meaningless to a person.

The answer has as many tokens as the demo model's answer to the same prompt (so
`TOKENWIRE_DEMO_PARAGRAPHS` sets the length) and keeps its pace
(`TOKENWIRE_DEMO_TOKENS_PER_SECOND`, `TOKENWIRE_DEMO_FIRST_TOKEN_DELAY`). Wall-clock time,
not the event loop's monotonic clock, because the reader is another process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from backend.protocol import ChatTurn
from backend.providers.base import Finish
from backend.providers.demo import DemoProvider, _last_user_prompt, cached_demo_tokens


def clock_token() -> str:
    """Now, as the clock model writes it: microseconds since the epoch and a space."""
    return f"{time.time_ns() // 1000} "


class ClockProvider(DemoProvider):
    """Yields `clock_token()` at each of the demo model's due times, then "stop"."""

    name = "clock"

    async def stream(self, turns: Sequence[ChatTurn]) -> AsyncIterator[str | Finish]:
        async for due in self.paced(self._count(turns)):
            for _ in due:
                # Read the clock only now, after any wait for the due time: the token is
                # produced at the moment it is handed over.
                yield clock_token()
        yield Finish("stop")

    async def batches(self, turns: Sequence[ChatTurn]) -> AsyncIterator[list[str] | Finish]:
        async for due in self.paced(self._count(turns)):
            # Overdue tokens are handed over together, so they are produced together.
            yield [clock_token()] * len(due)
        yield Finish("stop")

    def _count(self, turns: Sequence[ChatTurn]) -> int:
        return len(cached_demo_tokens(_last_user_prompt(turns), self.paragraphs))
