"""Figure 4: resume under random connection cuts. Resuming clients (harness/chaos.py: the
browser's client rules, every frame audited) keep many streams going while a TCP proxy in
front of the server cuts their connections at random: FIN or RST, half of them in the
middle of a frame (e2e/proxy.py `start_chaos`). Measured:

- time from a reconnect to the first replayed token: from the start of the connection
  attempt that succeeded after a cut to the first token (or end) of each stream resumed on
  it, p50 and p99; it includes the WebSocket upgrade, `hello`, the `resume` round trip and
  the log read;
- tokens lost and duplicated over at least 1,000 cuts (must be zero), and the streams
  whose final text is exactly the provider's.

Peers: tokenwire in one process, and two processes sharing Redis with one proxy in front
of each; every client rotates over the two, so each reconnect lands on the other node and
resumes a stream that the first node generates or generated.

    python -m bench.resume [--smoke] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.common import (
    TOKENWIRE,
    TOKENWIRE_REDIS,
    Config,
    Figure,
    bar_plot,
    fmt,
    progress,
    serve_peer,
)
from e2e.proxy import TcpProxy
from harness.chaos import Tally, run_streams

TITLE: Final = "Resume under random connection cuts"
PEERS: Final = (TOKENWIRE, TOKENWIRE_REDIS)
LOST: Final = "lost tokens"  # tests/unit/test_bench.py checks these two rows are all zero
DUPLICATED: Final = "duplicated tokens"


@dataclass(frozen=True)
class Size:
    cuts: int  # at least this many cuts per peer and repetition
    clients: int
    streams_per_client: int
    cuts_per_second: float
    tokens_per_second: float
    paragraphs: int
    max_seconds: float  # chaos stops then even if fewer cuts were made (reported)
    patience: float  # the longest one chat may take, cuts included


SMOKE = Size(20, 4, 2, 15.0, 200.0, 1, 15.0, 30.0)
FULL = Size(1000, 20, 3, 40.0, 100.0, 3, 120.0, 60.0)


@dataclass
class Outcome:
    tally: Tally
    cuts: int
    seconds: float


async def _measure(ports: list[int], size: Size, seed: int) -> Outcome:
    tally = Tally()
    proxies = [TcpProxy(port, max_connections=4 * size.clients).start() for port in ports]
    chaos_on = True
    began = time.monotonic()

    def cuts() -> int:
        return sum(p.cuts_made for p in proxies)

    async def stop_chaos_at_target() -> None:
        nonlocal chaos_on
        deadline = began + size.max_seconds
        # The cuts are counted on the proxies' own threads: polled, no event to wait on.
        while cuts() < size.cuts and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for proxy in proxies:
            proxy.stop_chaos()
        chaos_on = False

    try:
        for index, proxy in enumerate(proxies):
            proxy.start_chaos(
                size.cuts_per_second / len(proxies), size.max_seconds, seed=seed * 10 + index
            )
        await run_streams(
            [f"ws://127.0.0.1:{p.port}/ws" for p in proxies],
            tally,
            clients=size.clients,
            streams_per_client=size.streams_per_client,
            more=lambda: chaos_on,
            paragraphs=size.paragraphs,
            seed=seed,
            patience=size.patience,
            while_running=stop_chaos_at_target,
        )
    finally:
        for proxy in proxies:
            proxy.close()
    return Outcome(tally, cuts(), time.monotonic() - began)


def measure(name: str, tmp: Path, size: Size, seed: int) -> Outcome:
    with serve_peer(
        name, tmp, tokens_per_second=size.tokens_per_second, paragraphs=size.paragraphs
    ) as peer:
        ports = [peer.port] if peer.read_port is None else [peer.port, peer.read_port]
        return asyncio.run(_measure(ports, size, seed))


def run(config: Config) -> Figure:
    size = SMOKE if config.smoke else FULL
    figure = Figure("resume", TITLE)
    totals = {name: Tally() for name in PEERS}
    cuts_total = dict.fromkeys(PEERS, 0)
    with tempfile.TemporaryDirectory(prefix="chaos-resume-") as tmp:
        runs = [(r, name) for r in range(config.repetitions) for name in PEERS]
        for repetition, name in progress(runs, desc="resume"):
            outcome = measure(name, Path(tmp), size, seed=repetition + 1)
            t = outcome.tally
            figure.row(name, "reconnect to first replayed token, p50", "ms").samples.append(
                t.percentile(0.5) * 1000
            )
            figure.row(name, "reconnect to first replayed token, p99", "ms").samples.append(
                t.percentile(0.99) * 1000
            )
            figure.row(name, LOST, "tokens", goal="0").samples.append(t.lost)
            figure.row(name, DUPLICATED, "tokens", goal="0").samples.append(t.duplicated)
            figure.row(name, "stale live tokens before a resume's answer", "tokens").samples.append(
                t.stale
            )
            figure.row(name, "connection cuts", "cuts", goal=f">= {size.cuts:,}").samples.append(
                outcome.cuts
            )
            figure.row(name, "streams resumed", "resumes").samples.append(t.resumes)
            figure.row(name, "streams exact (provider's text once, in order)", "%").samples.append(
                100.0 * t.completed / t.chats if t.chats else 0.0
            )
            totals[name].add(t)
            cuts_total[name] += outcome.cuts
    for name in PEERS:
        t = totals[name]
        problems = t.problems()
        figure.notes.append(
            f"{name}: {cuts_total[name]:,} cuts, {t.chats:,} streams, {t.tokens:,} tokens "
            f"shown, {t.resumes:,} resumes, {t.drops:,} dropped connections; "
            f"lost: {t.lost}, duplicated: {t.duplicated}, wrong: {t.wrong}"
            + (f"; PROBLEMS: {'; '.join(problems)[:600]}" if problems else "; every stream exact")
        )
    for name in PEERS:
        nodes = ", ".join(f"{node} {count:,}" for node, count in totals[name].nodes.items())
        figure.notes.append(f"{name}: connections per node: {nodes}")
    redis = totals[TOKENWIRE_REDIS]
    if redis.drops:
        figure.notes.append(
            f"{TOKENWIRE_REDIS}: {redis.cross_node:,} of {redis.drops:,} reconnects landed on "
            "the other node (the rest followed a failed attempt, cut during the upgrade)."
        )
    figure.notes.append(
        "Stale live tokens: tokens at or below a resume's `after` that reached the new "
        "connection before its answer (live events of the stream not yet delivered when the "
        "connection opened, e.g. late from Redis); PROTOCOL.md allows this race and the "
        "client rule drops them, so they are counted apart from duplicates."
    )
    figure.notes.append(
        "Time to the first replayed token counts from the start of the successful "
        "reconnect attempt (backoff excluded); it includes waiting for the provider when "
        f"nothing new was produced during the outage ({fmt(size.tokens_per_second)} "
        "tokens/s per stream)."
    )
    bars = {}
    for name in PEERS:
        for q in ("p50", "p99"):
            row = figure.row(name, f"reconnect to first replayed token, {q}", "ms")
            bars[f"{name}\n{q}"] = (row.median, min(row.samples), max(row.samples))
    figure.plots.append(
        bar_plot(
            config.out / "resume.png",
            "Reconnect to first replayed token (under random cuts)",
            "ms",
            bars,
        )
    )
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    figure = run(Config(smoke=args.smoke, repeat=args.repeat))
    print(figure.markdown())


if __name__ == "__main__":
    main()
