"""The counters of one server process, shared by every part that counts something.

Parts hold the same `Metrics` object (the `Runtime` makes it, `ChatService.metrics` and
`Runtime.metrics` are it) and only ever add to it; `/metrics` renders it with the gauges
read from the parts when scraped. Plain integers: the event loop is the only writer.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Final

# Seconds: provider latency from request to first token, and between tokens.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Histogram:
    """A Prometheus histogram: cumulative counts are computed when rendered."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


@dataclass
class Metrics:
    """Counters since the process started (Prometheus `_total` counters)."""

    # Connections
    slow_consumer_closes: int = 0
    heartbeat_timeouts: int = 0
    connections_refused: int = 0
    # Delivery: frames written to clients and the tokens they carried (tokens - frames =
    # tokens that rode in a frame joined with others).
    token_frames_sent: int = 0
    tokens_sent: int = 0
    resumes_recovered: int = 0
    resumes_expired: int = 0
    # Requests
    replays: int = 0
    rate_limited: int = 0
    # Generation
    tokens_generated: int = 0
    provider_errors: int = 0
    first_token_seconds: Histogram = field(default_factory=Histogram)
