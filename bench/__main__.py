"""`python -m bench`: run every figure of the benchmark and write `<out>/results.md` (the
date, the machine, the versions, every figure's table and notes) and each figure's PNGs.

    python -m bench [--smoke] [--only idle,throughput,...] [--repeat N] [--out DIR]

The figures run in FIGURES order, each a module `bench.<name>` exposing
`run(config) -> Figure`; `results.json` holds the same rows for programs. A figure module
that is missing is a failure, not a skip: the results would silently lack a figure.
`--smoke` runs every figure at a tiny size in seconds (the test suite does, so the bench
never rots).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Final

from bench.common import RESULTS, Config, Figure, machine, progress, versions

FIGURES: Final = ("idle", "throughput", "latency", "resume", "page_load")


def header(config: Config, took: dict[str, float]) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    kind = "smoke run (tiny sizes, one repetition)" if config.smoke else "full run"
    lines = [
        "# tokenwire benchmark results",
        "",
        f"- {now}, {kind}; each figure the median of {config.repetitions} repetition(s), "
        "min to max in brackets. Ratios between peers are the result: the machine is shared.",
        f"- machine: {machine()}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "- seconds per figure: " + ", ".join(f"{k} {v:.0f}" for k, v in took.items()),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: proves the bench runs")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(FIGURES)}")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per figure")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results.md and PNGs go")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    config = Config(out=args.out, smoke=args.smoke, repeat=args.repeat)
    config.out.mkdir(parents=True, exist_ok=True)

    modules = {}
    missing = []
    for name in names:
        try:
            modules[name] = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"bench.{name}":
                raise
            missing.append(name)
    if missing:
        print(
            f"bench: figure module(s) missing: {', '.join(f'bench/{n}.py' for n in missing)}; "
            "run the others with --only",
            file=sys.stderr,
        )
        return 1

    figures: list[Figure] = []
    failed: list[str] = []
    took: dict[str, float] = {}
    for name in progress(names, desc="figures"):
        began = time.monotonic()
        try:
            figures.append(modules[name].run(config))
        except Exception:
            traceback.print_exc()
            failed.append(name)
        took[name] = time.monotonic() - began

    text = header(config, took) + "\n" + "\n".join(f.markdown() for f in figures)
    if failed:
        text += "\n" + "\n".join(f"## {n}: FAILED (see the traceback on stderr)" for n in failed)
    (config.out / "results.md").write_text(text)
    # The same numbers for programs (tests/unit/test_bench.py reads them): every sample kept.
    record = {
        "smoke": config.smoke,
        "failed": failed,
        "figures": [
            {
                "key": f.key,
                "title": f.title,
                "rows": [dataclasses.asdict(r) for r in f.rows],
                "notes": f.notes,
                "plots": [p.name for p in f.plots],
            }
            for f in figures
        ],
    }
    (config.out / "results.json").write_text(json.dumps(record, indent=1, allow_nan=True))
    print(text)
    print(f"bench: wrote {config.out / 'results.md'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
