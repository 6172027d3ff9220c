"""The chaos soak, full size: a few hundred concurrent streams (chats back to back) while a
TCP proxy cuts connections at random for a minute; then every client leaves and the
server must come back to what it held before. Prints the figures; exits 1 if any stream
was not exactly the provider's text or the server did not return to its baseline.

    python -m bench.soak [--seconds 60] [--streams 300] [--redis] [--rounds 1]

The clients and their audit are harness/chaos.py; the cuts are e2e/proxy.py `start_chaos`
(FIN or RST, half of them in the middle of a frame). Loopback only, bounded in time and
count. With `--redis`, two nodes share a Redis and each client reconnects to the other
node after every cut. Not part of `python -m bench` (a minute or more); the short
version runs in the test suite (tests/integration/test_soak.py).

Memory: server RSS before the clients came, its peak, after they left (and the gauges
were back), and after the stream logs' TTL passed and one new chat swept them (logs of
finished answers are kept `stream_ttl` by design; the soak runs with a short one so the
last figure shows what a leak would leave behind). CPython seldom hands freed memory back
to the system, so the proof of no leak is a plateau: with `--rounds 2` the same server
goes through the soak twice, and a leak would grow RSS again in the second round.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from bench.common import UNLIMITED, Usage, fmt
from e2e.proxy import TcpProxy
from harness.chaos import Tally, gauges, run_streams, warm_up
from harness.redis_server import start_redis
from harness.server import Client, Server, start_chat, start_server

MAX_SECONDS: Final = 600.0
MAX_STREAMS: Final = 2000
STREAM_TTL: Final = 5.0  # seconds a finished answer's log is kept, short for the last figure
SAMPLE_EVERY: Final = 0.5  # seconds between RSS samples
BASELINE_DEADLINE: Final = 60.0
PATIENCE: Final = 120.0  # the longest one chat may take, cuts included


@dataclass
class Figures:
    tally: Tally
    cuts: Counter[str]
    seconds: float
    rss_before: int = 0
    rss_peak: int = 0
    rss_left: int = 0
    rss_swept: int = 0
    gauges_before: list[dict[str, float]] = field(default_factory=list)
    gauges_after: list[dict[str, float]] = field(default_factory=list)
    back_to_baseline: bool = False
    logs_left: list[float] = field(default_factory=list)


def rss(servers: list[Server]) -> int:
    return sum(Usage(s.proc.pid).rss() for s in servers)


async def metrics_of(servers: list[Server]) -> list[dict[str, float]]:
    return [await asyncio.to_thread(s.metrics) for s in servers]


async def soak(servers: list[Server], args: argparse.Namespace, seed: int) -> Figures:
    clients = max(1, args.streams // args.per_client)
    for server in servers:
        await warm_up(server)
    before = [gauges(m) for m in await metrics_of(servers)]
    figures = Figures(Tally(), Counter(), 0.0, gauges_before=before)
    figures.rss_before = figures.rss_peak = rss(servers)

    async def sample_peak() -> None:
        while True:
            figures.rss_peak = max(figures.rss_peak, rss(servers))
            await asyncio.sleep(SAMPLE_EVERY)

    proxies = [TcpProxy(s.port, max_connections=2 * clients + 16).start() for s in servers]
    sampler = asyncio.create_task(sample_peak())
    began = time.monotonic()
    until = began + args.seconds
    try:
        for index, proxy in enumerate(proxies):
            proxy.start_chaos(
                args.cuts_per_second / len(proxies), args.seconds, seed=seed * 10 + index
            )
        await run_streams(
            [f"ws://127.0.0.1:{p.port}/ws" for p in proxies],
            figures.tally,
            clients=clients,
            streams_per_client=args.per_client,
            more=lambda: time.monotonic() < until,
            paragraphs=args.paragraphs,
            seed=seed,
            patience=PATIENCE,
        )
        figures.seconds = time.monotonic() - began
        for proxy in proxies:
            figures.cuts.update(proxy.stop_chaos())
    finally:
        for proxy in proxies:
            proxy.close()
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    figures.rss_peak = max(figures.rss_peak, rss(servers))

    now: list[dict[str, float]] = []

    async def settled() -> bool:
        now[:] = [gauges(m) for m in await metrics_of(servers)]
        return now == before

    deadline = time.monotonic() + BASELINE_DEADLINE
    while True:
        figures.back_to_baseline = await settled()
        if figures.back_to_baseline or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    figures.gauges_after = now
    figures.rss_left = rss(servers)

    # Let every finished answer's log expire, then one chat per node sweeps them.
    await asyncio.sleep(STREAM_TTL + 0.5)
    for server in servers:
        probe = await Client.connect(server)
        stream, _ = await start_chat(probe, "sweep")
        await probe.until_end(stream)
        await probe.close()
    figures.logs_left = [m.get("tokenwire_stream_logs", -1) for m in await metrics_of(servers)]
    figures.rss_swept = rss(servers)
    return figures


def report(figures: Figures, args: argparse.Namespace) -> str:
    t = figures.tally
    mb = 2**20
    cuts = sum(figures.cuts.values())
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(figures.cuts.items()))
    where = "two nodes + Redis, every reconnect on the other node" if args.redis else "one process"
    clients = max(1, args.streams // args.per_client)
    rows = [
        ("streams (chats started)", f"{t.chats:,}"),
        ("streams exact (provider's text once, in order)", f"{t.completed:,}"),
        ("streams failed / unfinished", f"{t.failed:,} / {t.unfinished:,}"),
        ("tokens received", f"{t.tokens:,} in {t.frames:,} token frames"),
        ("cuts made", f"{cuts:,} ({kinds})"),
        ("connections opened / dropped", f"{t.connects:,} / {t.drops:,}"),
        ("resumes (streams asked for again after a reconnect)", f"{t.resumes:,}"),
        ("tokens lost", f"{t.lost:,}"),
        ("tokens duplicated", f"{t.duplicated:,}"),
        ("stale live tokens before a resume's answer (allowed, dropped)", f"{t.stale:,}"),
        ("tokens wrong", f"{t.wrong:,}"),
        (
            "reconnect -> first replayed token, p50 / p99",
            f"{fmt(t.percentile(0.5) * 1000)} / {fmt(t.percentile(0.99) * 1000)} ms",
        ),
        (
            "server RSS before / peak / after clients left / after logs expired",
            f"{figures.rss_before / mb:.1f} / {figures.rss_peak / mb:.1f} / "
            f"{figures.rss_left / mb:.1f} / {figures.rss_swept / mb:.1f} MB",
        ),
        (
            "tasks before / after",
            " ; ".join(
                f"{b.get('tokenwire_tasks', 'n/a')} / {a.get('tokenwire_tasks', 'n/a')}"
                for b, a in zip(figures.gauges_before, figures.gauges_after, strict=True)
            ),
        ),
        ("gauges before", str(figures.gauges_before)),
        ("gauges after clients left", str(figures.gauges_after)),
        ("back to baseline", "yes" if figures.back_to_baseline else "NO"),
        ("stream logs after their TTL (one sweep chat each)", str(figures.logs_left)),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [
        f"tokenwire chaos soak: {figures.seconds:.0f} s, {args.streams} concurrent streams "
        f"({clients} clients x {args.per_client}), ~{fmt(args.cuts_per_second)} cuts/s, "
        f"{fmt(args.rate)} tokens/s per stream, {where}",
        "",
        *(f"{k.ljust(width)}  {v}" for k, v in rows),
    ]
    problems = t.problems()
    if problems:
        lines += ["", "PROBLEMS:", *problems]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the cuts go on")
    parser.add_argument("--streams", type=int, default=300, help="concurrent streams")
    parser.add_argument("--per-client", type=int, default=5, help="streams per connection")
    parser.add_argument("--cuts-per-second", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s of each stream")
    parser.add_argument("--paragraphs", type=int, default=3, help="length of each answer")
    parser.add_argument("--redis", action="store_true", help="two nodes sharing a Redis")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="soaks of the same server")
    parser.add_argument("--logs", type=Path, help="copy the servers' logs into this directory")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be in (0, {MAX_SECONDS:.0f}]")
    if not 0 < args.streams <= MAX_STREAMS or args.per_client < 1:
        parser.error(f"--streams must be in 1..{MAX_STREAMS}, --per-client at least 1")
    if args.cuts_per_second <= 0 or args.rate <= 0:
        parser.error("--cuts-per-second and --rate must be positive")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds must be in 1..10")
    env = {
        **UNLIMITED,
        "demo_tokens_per_second": args.rate,
        "demo_first_token_delay": 0.05,
        "demo_paragraphs": args.paragraphs,
        "stream_ttl": STREAM_TTL,
    }
    with tempfile.TemporaryDirectory(prefix="chaos-soak-") as tmp, ExitStack() as stack:
        servers: list[Server] = []
        if args.redis:
            redis = start_redis(Path(tmp))
            stack.callback(redis.stop)
            for label in "ab":
                node = start_server(Path(tmp), redis_url=redis.url, node=f"soak-{label}", **env)
                stack.callback(node.stop, signal.SIGKILL)
                servers.append(node)
        else:
            server = start_server(Path(tmp), **env)
            stack.callback(server.stop, signal.SIGKILL)
            servers.append(server)
        if args.logs is not None:
            args.logs.mkdir(parents=True, exist_ok=True)
            for server in servers:
                stack.callback(shutil.copy, server.log_path, args.logs)
        rounds = []
        for index in range(args.rounds):
            rounds.append(asyncio.run(soak(servers, args, seed=args.seed + index)))
            print(f"round {index + 1} of {args.rounds}:", report(rounds[-1], args), "", sep="\n")
    if len(rounds) > 1:
        mb = 2**20
        print(
            "server RSS after each round's clients left and logs expired: "
            + " / ".join(f"{r.rss_swept / mb:.1f}" for r in rounds)
            + f" MB (before the first: {rounds[0].rss_before / mb:.1f} MB)"
        )
    clean = all(not r.tally.problems() and r.back_to_baseline for r in rounds)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
