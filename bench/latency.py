"""Figure 3: added latency at light load. Every peer runs the clock provider (each token's
text is its production time in µs, `backend/providers/clock.py`), so a client on loopback
measures exactly "the provider produced the token" to "the client has it", p50 and p99,
at 10 and 100 concurrent streams of 50 tokens/s: bare websockets, python-socketio,
tokenwire in one process, and tokenwire through Redis (the chat goes to node a, which
generates; the same user's connection to node b is the one measured, so every token
crosses node a -> Redis -> node b).

Server and clients are pinned apart as in figure 2 (on an idle machine), except the
Redis hop's redis-server and two nodes, which the scheduler spreads over both cores. The
load client's chat goes over a WebSocket of the same user on node a, which therefore also
delivers every token (a user with two tabs). The client stamps a message with the time
its bytes arrived, before decoding, so decoding costs are not counted.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.common import (
    BARE,
    SOCKETIO,
    TOKENWIRE,
    TOKENWIRE_REDIS,
    Config,
    Figure,
    Peer,
    bar_plot,
    client_cpus,
    fmt,
    pinning_note,
    progress,
    serve_peer,
)
from bench.load import Plan, Tally, run_load

TITLE: Final = "Added latency at light load: token produced -> token received on loopback"
RATE: Final = 50.0
PEERS: Final = (BARE, SOCKETIO, TOKENWIRE, TOKENWIRE_REDIS)
GOALS_MS: Final = {TOKENWIRE: 1.0, TOKENWIRE_REDIS: 3.0}  # p99


@dataclass(frozen=True)
class Size:
    levels: tuple[int, ...]  # concurrent streams
    paragraphs: int
    stagger: float


SMOKE = Size(levels=(10,), paragraphs=0, stagger=0.1)
FULL = Size(levels=(10, 100), paragraphs=3, stagger=1.0)


def measure(peer: Peer, streams: int, size: Size) -> Tally:
    plan = Plan(
        kind=peer.kind,
        port=peer.port,
        read_port=peer.read_port,
        streams=streams,
        rate=RATE,
        paragraphs=size.paragraphs,
        clock=True,
        stagger=size.stagger,
        timeout=60.0,
        cpus=client_cpus(),
    )
    return run_load(plan)


def run(config: Config) -> Figure:
    size = SMOKE if config.smoke else FULL
    figure = Figure("latency", TITLE)
    checked = {"streams": 0, "exact": 0, "lost": 0, "duplicated": 0}
    with tempfile.TemporaryDirectory(prefix="benchcore-latency-") as tmp:
        runs = [(r, name) for r in range(config.repetitions) for name in PEERS]
        for _, name in progress(runs, desc="latency"):
            with serve_peer(name, Path(tmp), provider="clock", paragraphs=size.paragraphs) as peer:
                for streams in size.levels:
                    tally = measure(peer, streams, size)
                    for key in checked:
                        checked[key] += getattr(tally, key)
                    figure.row(name, "tokens received", "tokens").samples.append(
                        float(tally.tokens)
                    )
                    for q in (50, 99):
                        goal = GOALS_MS.get(name) if q == 99 else None
                        row = figure.row(
                            name,
                            f"p{q}, {streams} streams",
                            "ms",
                            f"< {fmt(goal)} ms" if goal else "",
                        )
                        row.samples.append(tally.percentile(q))
    for row in figure.rows:  # tokens received: the sum over levels, per repetition
        if row.metric == "tokens received" and len(size.levels) > 1:
            row.samples = [
                sum(row.samples[i : i + len(size.levels)])
                for i in range(0, len(row.samples), len(size.levels))
            ]
    top = max(size.levels)
    for name, goal in GOALS_MS.items():
        p99 = _median(figure, name, f"p99, {top} streams")
        if p99 is not None:
            verdict = "met" if p99 < goal else "missed"
            figure.notes.append(
                f"{name}: p99 {fmt(p99)} ms at {top} streams (goal < {fmt(goal)} ms: {verdict})."
            )
    bare = _median(figure, BARE, f"p99, {top} streams")
    tw = _median(figure, TOKENWIRE, f"p99, {top} streams")
    if bare and tw:
        figure.notes.append(f"p99 at {top} streams, tokenwire / bare websockets: {tw / bare:.2f}x.")
    figure.notes.append(
        f"Streams: {checked['streams']}, each token once and in order: {checked['exact']}, "
        f"tokens lost: {checked['lost']}, duplicated: {checked['duplicated']}. "
        f"Each stream {size.paragraphs}-paragraph demo length at {RATE:.0f} tokens/s; "
        + pinning_note()
        + " (the Redis hop's three processes are left to the scheduler)."
    )
    bars = {}
    for name in PEERS:
        row = next(
            (r for r in figure.rows if r.peer == name and r.metric == f"p99, {top} streams"), None
        )
        if row and row.samples:
            bars[name] = (row.median, min(row.samples), max(row.samples))
    figure.plots.append(
        bar_plot(
            config.out / "latency.png",
            f"p99 added latency, {top} streams at {RATE:.0f} tokens/s",
            "ms (token produced -> received)",
            bars,
        )
    )
    return figure


def _median(figure: Figure, peer: str, metric: str) -> float | None:
    for row in figure.rows:
        if row.peer == peer and row.metric == metric and row.samples:
            return statistics.median(row.samples)
    return None
