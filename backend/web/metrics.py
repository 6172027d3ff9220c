"""The counters of one server process, shared by every part that counts something.

Parts hold the same `Metrics` object (the `Runtime` makes it, `ChatService.metrics` and
`Runtime.metrics` are it) and only ever add to it; `/metrics` renders it with the gauges
read from the parts when scraped. Plain integers: the event loop is the only writer.
"""

from __future__ import annotations

import math
import os
import resource
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Final, Literal

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


# Where a failure of the server's own code can be contained (`Metrics.contained_failures`): one
# client frame, one WebSocket connection's machinery, one stream's delivery to one client,
# one HTTP or SSE request, and a task or callback of the event loop that nothing awaited.
FAILURE_PLACES: Final = ("frame", "connection", "delivery", "http", "loop")


@dataclass
class Labelled:
    """A counter with one label: `counts[value]` for each value of `label`."""

    label: str
    counts: dict[str, int]

    def add(self, value: str) -> None:
        self.counts[value] = self.counts.get(value, 0) + 1


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
    # Failures of our own code that were contained, by place (`FAILURE_PLACES`).
    contained_failures: Labelled = field(
        default_factory=lambda: Labelled("place", dict.fromkeys(FAILURE_PLACES, 0))
    )
    first_token_seconds: Histogram = field(default_factory=Histogram)


# ---- rendering ---------------------------------------------------------------------------

PREFIX: Final = "tokenwire_"

# HELP text of each `Metrics` field; a field missing here is still rendered, with its name
# as its help (tests/integration/test_metrics.py checks that the README documents every metric).
HELP: Final[dict[str, str]] = {
    "slow_consumer_closes": "Clients closed for not reading (WebSocket 4001, SSE ended)",
    "heartbeat_timeouts": "WebSocket connections closed with 4000 (no pong in time)",
    "connections_refused": "WebSocket upgrades and SSE requests refused by admission",
    "token_frames_sent": "Token frames written to clients",
    "tokens_sent": "Tokens written to clients (minus token frames: tokens coalesced)",
    "resumes_recovered": "Catch-ups of a client from the stream log that completed",
    "resumes_expired": "Resumes answered stream_expired (the log was gone)",
    "replays": "Chat requests answered by replaying an earlier request with the same id",
    "rate_limited": "Requests refused with rate_limited",
    "tokens_generated": "Tokens produced by the model",
    "provider_errors": "Generations that ended with provider_error",
    "first_token_seconds": "Seconds from a generation's start to its first token",
    "contained_failures": "Exceptions of the server's own code that were contained, by place "
    "(frame: answered internal; connection: closed 1011; delivery: one stream ended for one "
    "client with internal; http: answered 500; loop: an unawaited task or callback)",
}


@dataclass(frozen=True)
class Sample:
    """One metric read when scraped: `kind` is gauge or counter (a counter's name ends in
    `_total`)."""

    name: str
    kind: Literal["gauge", "counter"]
    help: str
    value: float


def render(metrics: Metrics, samples: Iterable[Sample] = ()) -> str:
    """Prometheus text format (0.0.4): every field of `metrics` (numbers as counters named
    `tokenwire_<field>_total`, histograms as `tokenwire_<field>_bucket/_sum/_count`), then
    `samples`. Pure: the caller reads the gauges."""
    lines: list[str] = []
    for f in fields(metrics):
        value = getattr(metrics, f.name)
        help_text = HELP.get(f.name, f.name.replace("_", " "))
        if isinstance(value, Histogram):
            lines += _histogram(PREFIX + f.name, help_text, value)
        elif isinstance(value, Labelled):
            lines += _labelled(f"{PREFIX}{f.name}_total", help_text, value)
        elif isinstance(value, int | float):
            lines += _sample(Sample(f"{PREFIX}{f.name}_total", "counter", help_text, value))
    for sample in samples:
        lines += _sample(sample)
    return "\n".join(lines) + "\n"


def _sample(s: Sample) -> list[str]:
    return [
        f"# HELP {s.name} {_help(s.help)}",
        f"# TYPE {s.name} {s.kind}",
        f"{s.name} {_num(s.value)}",
    ]


def _histogram(name: str, help_text: str, h: Histogram) -> list[str]:
    lines = [f"# HELP {name} {_help(help_text)}", f"# TYPE {name} histogram"]
    cumulative = 0
    for bound, count in zip((*h.buckets, math.inf), h.counts, strict=True):
        cumulative += count
        lines.append(f'{name}_bucket{{le="{_num(bound)}"}} {cumulative}')
    lines += [f"{name}_sum {_num(h.total)}", f"{name}_count {h.count}"]
    return lines


def _labelled(name: str, help_text: str, counter: Labelled) -> list[str]:
    lines = [f"# HELP {name} {_help(help_text)}", f"# TYPE {name} counter"]
    for value, count in counter.counts.items():
        lines.append(f'{name}{{{counter.label}="{value}"}} {count}')
    return lines


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _help(text: str) -> str:
    # The format's only escapes in HELP: backslash and newline.
    return text.replace("\\", "\\\\").replace("\n", "\\n")


# ---- the process -------------------------------------------------------------------------


def process_samples() -> list[Sample]:
    """Memory and file descriptors of this process, from /proc on Linux (no dependency);
    elsewhere only the peak RSS that `resource` knows."""
    samples: list[Sample] = []
    try:
        with open("/proc/self/statm", "rb") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        rss_help = "Resident memory"
    except (OSError, ValueError, IndexError):
        # ru_maxrss is the peak, in KiB on Linux: better than nothing off Linux.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rss_help = "Peak resident memory (no /proc here)"
    samples.append(Sample("process_resident_memory_bytes", "gauge", rss_help, rss))
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    else:
        samples.append(Sample("process_open_fds", "gauge", "Open file descriptors", fds))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit != resource.RLIM_INFINITY:
        samples.append(Sample("process_max_fds", "gauge", "Limit of open file descriptors", limit))
    return samples
