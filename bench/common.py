"""What every benchmark shares: its configuration, repeated samples summarised as median
(min to max), figures rendered as Markdown tables and PNG plots, progress bars, and the
processes under test measured with psutil.

A benchmark module exposes `run(config: Config) -> Figure`. It measures; it asserts
nothing about speed. `python -m bench` runs them all and writes `bench/results/`.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

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
    if abs(value) >= 100 or (value == int(value) and abs(value) < 1e15):
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
    reference: tuple[str, Sequence[tuple[float, float]]] | None = None,
    logy: bool = False,
) -> Path:
    """One line per series; `reference`: (label, points) drawn dashed grey (an ideal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, points in series.items():
        if points:
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=label)
    if reference is not None:
        label, points = reference
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, linestyle="--", color="grey", label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
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


# ---- the servers under test -------------------------------------------------------------

BARE = "bare websockets"
SOCKETIO = "python-socketio"
TOKENWIRE = "tokenwire"
TOKENWIRE_REDIS = "tokenwire via Redis"
# tokenwire served with uvicorn's own WebSocket protocol (TOKENWIRE_WEBSOCKET_SERVER=uvicorn):
# what a connection cost before it could detach from its ASGI call (the idle figure).
TOKENWIRE_UVICORN = "tokenwire, uvicorn's WebSocket"
# The load client's protocol for each peer (bench.load.KINDS).
KIND = {
    BARE: "bare",
    SOCKETIO: "socketio",
    TOKENWIRE: "tokenwire",
    TOKENWIRE_REDIS: "tokenwire",
    TOKENWIRE_UVICORN: "tokenwire",
}
_PEER_MODULES = {BARE: "bench.peers.bare_ws", SOCKETIO: "bench.peers.socketio_app"}
# Rate limits and connection caps that would refuse a load test's clients, lifted.
UNLIMITED = {
    "chat_rate": 1_000_000,
    "chat_burst": 1_000_000,
    "connect_rate": 1_000_000,
    "connect_burst": 1_000_000,
    "max_connections": 1_000_000,
    "max_connections_per_user": 1_000_000,
}
SERVER_CPUS = (0,)  # servers here, load clients on the rest: they do not fight for a core
CLIENT_CPUS = (1,)
BUSY_LOAD = 1.0  # load average from which other work would stall a pinned server
_split: tuple[tuple[int, ...], tuple[int, ...]] | None = None


def pinning() -> bool:
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


def cpu_split() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(server CPUs, client CPUs), chosen once per run. On an otherwise idle machine (load
    average under BUSY_LOAD) the server gets one CPU and the clients the others, so they
    never take each other's core. On a busy one nothing is pinned: a pinned server cannot
    escape other processes' work (measured here: p99 lateness of a pinned bare server at
    25 streams 38-300 ms, unpinned 15 ms), while the clients use a small share of a core."""
    global _split
    if _split is None:
        if not pinning() or os.getloadavg()[0] >= BUSY_LOAD:
            _split = ((), ())
        else:
            mine = sorted(os.sched_getaffinity(0))
            server = tuple(c for c in SERVER_CPUS if c in mine) or (mine[0],)
            _split = (server, tuple(c for c in mine if c not in server))
    return _split


def pinning_note() -> str:
    """How this run placed servers and clients, for a figure's notes."""
    server, clients = cpu_split()
    if not pinning():
        return "one CPU: server and clients share it (no pinning)"
    if not server:
        return (
            "no CPU pinning: the machine was busy with other work (load average "
            f"{os.getloadavg()[0]:.1f} at the end), which a pinned server could not escape"
        )
    return (
        f"server pinned to CPU {','.join(map(str, server))}, load clients to CPU "
        f"{','.join(map(str, clients))}"
    )


def server_cpus() -> tuple[int, ...]:
    return cpu_split()[0]


def client_cpus() -> tuple[int, ...]:
    return cpu_split()[1]


def pin(pid: int, cpus: Sequence[int]) -> None:
    """Pin every thread of `pid` and of its children to `cpus` (threads made later inherit
    it from the thread that makes them). Nothing when the machine has one CPU."""
    if not pinning() or not cpus:
        return
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for proc in procs:
        try:
            for thread in proc.threads():
                os.sched_setaffinity(thread.id, set(cpus))
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass


@dataclass
class Peer:
    """A server under test: chats go to `port`; `read_port` (the Redis hop) is where the
    same user's other connection reads. `pid` is the process whose CPU counts."""

    name: str
    port: int
    pid: int
    read_port: int | None = None

    @property
    def kind(self) -> str:
        return KIND[self.name]


@contextmanager
def serve_peer(
    name: str,
    tmp: Path,
    *,
    provider: str = "demo",
    tokens_per_second: float = 50.0,
    paragraphs: int = 3,
    **tokenwire_env: Any,
) -> Iterator[Peer]:
    """Start peer `name` on a free port with the demo (or clock) provider at the given pace,
    pinned to `server_cpus()`; stop it (and any Redis it needed) on exit. `tokenwire_env`:
    more TOKENWIRE_* settings for tokenwire."""
    from harness.redis_server import start_redis
    from harness.server import start_server

    stack = ExitStack()
    with stack:
        if name in _PEER_MODULES:
            port = free_port()
            log = (tmp / f"{KIND[name]}-{port}.log").open("wb")
            stack.callback(log.close)
            proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", _PEER_MODULES[name], "--port", str(port)),
                    *("--provider", provider, "--tokens-per-second", str(tokens_per_second)),
                    *("--paragraphs", str(paragraphs), "--first-token-delay", "0"),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            stack.callback(_kill, proc)
            wait_port(port)
            pin(proc.pid, server_cpus())
            yield Peer(name, port, proc.pid)
            return
        env = {
            **UNLIMITED,
            "provider": provider,
            "demo_tokens_per_second": tokens_per_second,
            "demo_first_token_delay": 0,
            "demo_paragraphs": paragraphs,
            **tokenwire_env,
        }
        if name in (TOKENWIRE, TOKENWIRE_UVICORN):
            if name == TOKENWIRE_UVICORN:
                env["websocket_server"] = "uvicorn"
            server = start_server(tmp, **env)
            stack.callback(server.stop, signal.SIGKILL)
            pin(server.proc.pid, server_cpus())
            yield Peer(name, server.port, server.proc.pid)
            return
        if name != TOKENWIRE_REDIS:
            raise ValueError(f"unknown peer {name!r}; one of {', '.join(KIND)}")
        redis = start_redis(tmp)
        stack.callback(redis.stop)
        nodes = []
        for label in ("a", "b"):
            node = start_server(tmp, redis_url=redis.url, node=f"bench-{label}", **env)
            stack.callback(node.stop, signal.SIGKILL)
            nodes.append(node)
        # Not pinned: three busy processes (redis-server and two nodes) on one core would
        # measure that core's queue, not the hop; the scheduler spreads them over both.
        # The chats go to node a, which generates; node b delivers them: its CPU is the hop.
        yield Peer(name, nodes[0].port, nodes[1].proc.pid, read_port=nodes[1].port)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("litestar", "uvicorn", "websockets", "python-socketio", "uvloop", "msgspec"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def machine() -> str:
    ram = psutil.virtual_memory().total / 2**30
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{cpu_count()} CPUs ({platform.processor() or platform.machine()}), {ram:.1f} GiB RAM; "
        f"load average before the run {load} (other work on the machine skews every figure)"
    )
