"""Figure 1: idle connections. How much server memory and CPU one idle connection costs,
and how fast connections open, for each peer; then 100k tokenwire connections across
several processes sharing one Redis.

The peers include tokenwire served with uvicorn's own WebSocket protocol
(TOKENWIRE_WEBSOCKET_SERVER=uvicorn): the before of detaching connections from their ASGI
call (`backend/transports/wsserver.py`), measured in the same run.

Per peer (one server process, pinned away from the client): a client process
(`bench.idle_client`) opens a few warm-up connections, the server's RSS is taken, then it
opens up to each level (1k, 10k, and just under the per-process open-file limit), every
connection completing the `hello` (Socket.IO: the namespace connect) and answering each
heartbeat. At each level: memory per connection = (RSS - RSS after warm-up) / (new
connections); then a quiet window of two heartbeat periods gives the server CPU per
heartbeat period (for tokenwire, the CPU of one heartbeat sweep with everything else an
idle connection costs). Connections opened per second is measured over the whole opening.

Then tokenwire at 100k: MULTI_SERVERS processes with one redis-server, MULTI_CLIENTS
client processes each from its own loopback source address, spread over every server.

Socket.IO pings every 25 s (its default) and the bare server not at all; tokenwire uses a
HEARTBEAT of 5 s here so that sweeps happen in the window. The CPU rows are therefore per
5 s of idleness for every peer. The 100k run uses tokenwire's default 30 s heartbeat (see
MULTI_HEARTBEAT) and its CPU row is per 30 s.
"""

from __future__ import annotations

import json
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Final

from bench.common import (
    BARE,
    KIND,
    ROOT,
    SOCKETIO,
    TOKENWIRE,
    TOKENWIRE_UVICORN,
    UNLIMITED,
    Config,
    Figure,
    Usage,
    client_cpus,
    line_plot,
    loopback_sources,
    pin,
    progress,
    ratio,
    serve_peer,
)
from bench.load import SOCKETIO_PATH

PEERS: Final = (TOKENWIRE, TOKENWIRE_UVICORN, BARE, SOCKETIO)
LEVELS: Final = (1_000, 10_000, 19_500)  # the last just under the 20,000 open files
SMOKE_LEVELS: Final = (200,)
WARMUP: Final = 20  # connections opened before the baseline RSS (first-use imports, caches)
HEARTBEAT: Final = 5.0
SMOKE_HEARTBEAT: Final = 0.5
SETTLE: Final = 1.0  # seconds after opening before RSS is read
MULTI_TOTAL: Final = 100_000
# The 100k run pings at the default 30 s: at 5 s, answering the pings of the connections
# already held took most of both cores here (~86 µs per ping round trip), and opening slowed
# to ~30/s at 62k.
MULTI_HEARTBEAT: Final = 30.0
MULTI_SERVERS: Final = 6  # 100k / 6 = 16.7k each, under the open-file limit
MULTI_CLIENTS: Final = 6  # each from its own source address (~28k ephemeral ports each)
MULTI_STEPS: Final = 4
ANSWER_TIMEOUT: Final = 30.0  # for a `stats` answer
MIN_OPEN_RATE: Final = 20.0  # an `open N` slower than this is a failure (bounds the wait)
PATH: Final = {TOKENWIRE: "/ws", TOKENWIRE_UVICORN: "/ws", BARE: "/", SOCKETIO: SOCKETIO_PATH}
MULTI: Final = f"tokenwire, {MULTI_SERVERS} processes + Redis"


class IdleClient:
    """One `bench.idle_client` process, driven line by line (see its docstring)."""

    def __init__(self, kind: str, urls: Sequence[str], source: str, tmp: Path) -> None:
        self.log = (tmp / f"idle-client-{source}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "bench.idle_client", "--dialect", kind),
                *("--source", source, *urls),
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        pin(self.proc.pid, client_cpus())

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float) -> dict[str, float]:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError(f"idle client gave no answer in {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"idle client exited with {self.proc.poll()}")
        result: dict[str, float] = json.loads(line)
        return result

    def ask(self, line: str, timeout: float = ANSWER_TIMEOUT) -> dict[str, float]:
        self.send(line)
        return self.answer(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


def open_timeout(count: int) -> float:
    return 60.0 + count / MIN_OPEN_RATE


def open_all(clients: Sequence[IdleClient], each: int) -> dict[str, float]:
    """Every client opens `each` more connections at the same time; their sums (seconds:
    the longest). The time bound is for all of them together: they share the servers."""
    for client in clients:
        client.send(f"open {each}")
    deadline = time.monotonic() + open_timeout(each * len(clients))
    answers = [client.answer(max(1.0, deadline - time.monotonic())) for client in clients]
    return {
        "open": sum(a["open"] for a in answers),
        "opened": sum(a["opened"] for a in answers),
        "failed": sum(a["failed"] for a in answers),
        "seconds": max(a["seconds"] for a in answers),
    }


def stats_all(clients: Sequence[IdleClient]) -> dict[str, float]:
    answers = [client.ask("stats") for client in clients]
    return {key: sum(a[key] for a in answers) for key in ("open", "pings", "closed", "failed")}


def quiet_window(
    usages: Sequence[Usage], clients: Sequence[IdleClient], seconds: float
) -> tuple[float, dict[str, float]]:
    """Server CPU seconds over `seconds` of idleness, and what the clients saw meanwhile
    (`pings` answered in the window, `closed` since the start)."""
    before = stats_all(clients)
    cpu0 = sum(u.cpu_seconds() for u in usages)
    began = time.monotonic()
    time.sleep(seconds)
    cpu = sum(u.cpu_seconds() for u in usages) - cpu0
    elapsed = time.monotonic() - began
    after = stats_all(clients)
    after["pings"] -= before["pings"]
    return cpu * seconds / elapsed, after


def raise_file_limit() -> None:
    """Up to the hard limit: the client and server processes inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def single(
    peer: str, tmp: Path, fig: Figure, levels: Sequence[int], heartbeat: float
) -> list[tuple[float, float]]:
    """One repetition for one peer; returns (connections, KB per connection) points."""
    points = []
    window = 2 * heartbeat
    with ExitStack() as stack:
        server = stack.enter_context(serve_peer(peer, tmp, heartbeat=heartbeat))
        url = f"ws://127.0.0.1:{server.port}{PATH[peer]}"
        client = IdleClient(KIND[peer], [url], loopback_sources(1)[0], tmp)
        stack.callback(client.stop)
        usage = Usage(server.pid)
        client.ask(f"open {WARMUP}", open_timeout(WARMUP))
        time.sleep(SETTLE)
        rss0 = usage.rss()
        held, opened, seconds = WARMUP, 0.0, 0.0
        for level in progress(levels, desc=f"idle {peer}"):
            try:
                got = client.ask(f"open {level - held}", open_timeout(level - held))
            except TimeoutError:
                fig.notes.append(
                    f"{peer}: opening {level - held:,} more connections (from {held:,}) took "
                    f"longer than {open_timeout(level - held):.0f} s; levels from {level:,} "
                    "on were not measured"
                )
                break
            held, opened, seconds = (
                int(got["open"]),
                opened + got["opened"],
                seconds + got["seconds"],
            )
            time.sleep(SETTLE)
            kb = (usage.rss() - rss0) / max(1, held - WARMUP) / 1024
            goal = "≤ 16" if peer == TOKENWIRE else ""
            fig.row(peer, f"memory per connection at {level:,}", "KB", goal).samples.append(kb)
            points.append((held, kb))
            cpu, seen = quiet_window([usage], [client], window)
            per_period = cpu * heartbeat / window
            fig.row(peer, f"CPU per {heartbeat:g} s idle at {level:,}", "ms").samples.append(
                per_period * 1e3
            )
            if seen["closed"] or got["failed"]:
                fig.notes.append(
                    f"{peer} at {level:,}: {got['failed']:.0f} connections failed to open and "
                    f"{seen['closed']:.0f} were closed by the server while idle"
                )
        if seconds > 0:
            fig.row(peer, "connections opened per second", "1/s").samples.append(opened / seconds)
            fig.row(peer, "CPU per connection per heartbeat (top level)", "µs").samples.append(
                per_period / max(1, held) * 1e6
            )
            fig.row(peer, "connections held at the top level", "").samples.append(seen["open"])
    return points


def multi(
    tmp: Path, fig: Figure, heartbeat: float = MULTI_HEARTBEAT, total: int = MULTI_TOTAL
) -> tuple[float, float] | None:
    """`total` (100k) tokenwire connections over MULTI_SERVERS processes and one Redis;
    None if they could not be opened in time (noted in the figure)."""
    from harness.redis_server import start_redis
    from harness.server import start_server

    window = heartbeat  # one sweep: a longer window would make the run long
    with ExitStack() as stack:
        redis = start_redis(tmp)
        stack.callback(redis.stop)
        servers = []
        for i in range(MULTI_SERVERS):
            server = start_server(
                tmp, redis_url=redis.url, node=f"idle-{i}", heartbeat=heartbeat, **UNLIMITED
            )
            stack.callback(server.stop, signal.SIGKILL)
            servers.append(server)
        urls = [s.ws_url for s in servers]
        clients = []
        for source in loopback_sources(MULTI_CLIENTS):
            client = IdleClient("tokenwire", urls, source, tmp)
            stack.callback(client.stop)
            clients.append(client)
        usages = [Usage(s.proc.pid) for s in servers]
        open_all(clients, WARMUP)
        time.sleep(SETTLE)
        rss0 = sum(u.rss() for u in usages)
        per_client = total // MULTI_CLIENTS - WARMUP
        got: dict[str, float] = {}
        opened = seconds = 0.0
        for step in progress(range(MULTI_STEPS), desc=f"idle {total:,}"):
            chunk = per_client // MULTI_STEPS + (per_client % MULTI_STEPS if step == 0 else 0)
            try:
                got = open_all(clients, chunk)
            except TimeoutError:
                fig.notes.append(
                    f"{MULTI}: {total:,} connections could not be opened in time (step "
                    f"{step + 1} of {MULTI_STEPS}, {opened:,.0f} opened before it); "
                    "not measured"
                )
                return None
            opened, seconds = opened + got["opened"], seconds + got["seconds"]
        time.sleep(SETTLE)
        held = int(got["open"])
        kb = (sum(u.rss() for u in usages) - rss0) / max(1, held - WARMUP * MULTI_CLIENTS) / 1024
        cpu, seen = quiet_window(usages, clients, window)
        per_period = cpu * heartbeat / window
        fig.row(MULTI, f"memory per connection at {total:,}", "KB", "≤ 16").samples.append(kb)
        fig.row(MULTI, "connections opened per second", "1/s").samples.append(
            opened / max(seconds, 1e-9)
        )
        fig.row(MULTI, f"CPU per {heartbeat:g} s idle at {total:,}", "ms").samples.append(
            per_period * 1e3
        )
        fig.row(MULTI, "CPU per connection per heartbeat (top level)", "µs").samples.append(
            per_period / max(1, held) * 1e6
        )
        fig.row(MULTI, "connections held", "", f"{total:,}").samples.append(seen["open"])
        if seen["closed"] or got["failed"]:
            fig.notes.append(
                f"{MULTI}: {got['failed']:.0f} failed to open in the last step, "
                f"{seen['closed']:.0f} closed by a server while idle"
            )
        return held, kb


def run(config: Config) -> Figure:
    raise_file_limit()
    levels = SMOKE_LEVELS if config.smoke else LEVELS
    heartbeat = SMOKE_HEARTBEAT if config.smoke else HEARTBEAT
    fig = Figure(
        key="idle",
        title="Idle connections: server memory, opening rate, heartbeat CPU",
    )
    series: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="idle-bench-") as name:
        tmp = Path(name)
        for _ in progress(range(config.repetitions), desc="idle repetitions"):
            for peer in PEERS:
                series.setdefault(peer, []).extend(single(peer, tmp, fig, levels, heartbeat))
            if not config.smoke:
                point = multi(tmp, fig)
                if point is not None:
                    series.setdefault(MULTI, []).append(point)
    add_notes(fig, levels[-1])
    fig.plots.append(
        line_plot(
            config.out / "idle.png",
            "Server memory per idle connection",
            "connections held",
            "KB per connection (RSS delta / N)",
            series,
            logx=True,
        )
    )
    return fig


def add_notes(fig: Figure, top: int) -> None:
    def median(peer: str, metric: str) -> float | None:
        for row in fig.rows:
            if row.peer == peer and row.metric == metric and row.samples:
                return row.median
        return None

    metric = f"memory per connection at {top:,}"
    mine = median(TOKENWIRE, metric)
    if mine is not None:
        verdict = "met" if mine <= 16 else "missed"
        fig.notes.append(
            f"Goal ≤ 16 KB per idle tokenwire connection (Centrifugo publishes 27 KB): "
            f"{mine:.1f} KB at {top:,}, {verdict}. The kernel adds ~5-10 KB per socket "
            "outside the process."
        )
        for peer in (TOKENWIRE_UVICORN, BARE, SOCKETIO):
            theirs = median(peer, metric)
            if theirs is not None:
                fig.notes.append(f"tokenwire / {peer} memory per connection: {ratio(mine, theirs)}")
    held = median(MULTI, "connections held")
    if held is not None:
        verdict = "met" if held >= MULTI_TOTAL * 0.999 else "missed"
        fig.notes.append(f"Goal {MULTI_TOTAL:,} held on this machine: {held:,.0f}, {verdict}.")
