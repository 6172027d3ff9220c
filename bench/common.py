"""What every benchmark shares: its configuration, repeated samples summarised as median
(min to max), figures rendered as Markdown tables and PNG plots, progress bars, and the
processes under test measured with psutil.

A benchmark module exposes `run(config: Config) -> Figure`. It measures; it asserts
nothing about speed. `python -m bench` runs them all and writes `bench/results/`.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    """`smoke`: a few seconds in all, tiny sizes, one repetition: proves the bench runs
    (it is part of `make test`). `repeat`: repetitions per figure in a full run."""

    out: Path = RESULTS
    smoke: bool = False
    repeat: int = 3

    @property
    def repetitions(self) -> int:
        return 1 if self.smoke else self.repeat


@dataclass
class Row:
    """One measured quantity of one peer: every repetition's value is kept."""

    peer: str
    metric: str
    unit: str
    samples: list[float] = field(default_factory=list)
    goal: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def cell(self) -> str:
        if not self.samples:
            return "not measured"
        lo, hi = min(self.samples), max(self.samples)
        if len(self.samples) == 1 or lo == hi:
            return fmt(self.median)
        return f"{fmt(self.median)} ({fmt(lo)} to {fmt(hi)})"


@dataclass
class Figure:
    key: str  # file-name stem: results/<key>.png
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # ratios, goals met or missed, caveats
    plots: list[Path] = field(default_factory=list)

    def row(self, peer: str, metric: str, unit: str, goal: str = "") -> Row:
        """The row for (peer, metric), made on first use: add samples to it."""
        for r in self.rows:
            if r.peer == peer and r.metric == metric:
                return r
        r = Row(peer, metric, unit, goal=goal)
        self.rows.append(r)
        return r

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.rows:
            lines += [
                "| peer | metric | median (min to max) | unit | goal |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {r.peer} | {r.metric} | {r.cell()} | {r.unit} | {r.goal} |" for r in self.rows
            ]
            lines.append("")
        lines += [f"- {note}" for note in self.notes]
        lines += [f"![{self.title}]({p.name})" for p in self.plots]
        return "\n".join(lines).rstrip() + "\n"


def fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def ratio(a: float, b: float) -> str:
    return "n/a" if b == 0 else f"{a / b:.2f}x"


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A progress bar on stderr over `items`."""
    yield from tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)


def line_plot(
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    series: dict[str, Sequence[tuple[float, float]]],
    logx: bool = False,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, points in series.items():
        if points:
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def bar_plot(
    path: Path, title: str, ylabel: str, bars: dict[str, tuple[float, float, float]]
) -> Path:
    """`bars`: label -> (median, min, max); the whiskers show min and max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    labels = list(bars)
    medians = [bars[k][0] for k in labels]
    errors = [
        [bars[k][0] - bars[k][1] for k in labels],
        [bars[k][2] - bars[k][0] for k in labels],
    ]
    ax.bar(labels, medians, yerr=errors, capsize=4)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


class Usage:
    """RSS and CPU time of a process (and its children), for deltas around a load."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)

    def _all(self) -> list[psutil.Process]:
        return [self.proc, *self.proc.children(recursive=True)]

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self._all())

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self._all():
            t = p.cpu_times()
            total += t.user + t.system
        return total


def loopback_sources(count: int) -> list[str]:
    """Distinct loopback source addresses (127.0.0.1, 127.0.0.2, ...): each has its own
    ~28k ephemeral ports, so more connections than that go out from several."""
    return [f"127.0.0.{i}" for i in range(1, count + 1)]


def cpu_count() -> int:
    return os.cpu_count() or 1
