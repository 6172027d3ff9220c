"""The benchmark never rots: `python -m bench --smoke` runs every figure at a tiny size, in
a subprocess as a user would, and must produce every figure's table and plots holding
real measurements (tokens actually received, the resume figure's losses at zero). Speed
itself is never asserted: that is what the full bench reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import floors
from bench.__main__ import FIGURES
from bench.resume import DUPLICATED, LOST
from harness.server import ROOT

SMOKE_TIMEOUT = 170.0  # the whole smoke run takes well under a minute on two idle cores
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def values(figure: dict[str, Any], metric: str) -> dict[str, list[float]]:
    """peer -> samples of `metric` in `figure`."""
    return {r["peer"]: r["samples"] for r in figure["rows"] if r["metric"] == metric}


def test_smoke_run_writes_every_figure_with_measured_values(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
    )
    # The tracebacks, without the progress bars around them.
    errors = (
        result.stderr[result.stderr.find("Traceback") :] if "Traceback" in result.stderr else ""
    )
    assert result.returncode == 0, errors[-6000:] or result.stderr[-3000:]
    markdown = (tmp_path / "results.md").read_text()
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["failed"] == []
    figures = {f["key"]: f for f in record["figures"]}
    assert list(figures) == list(FIGURES)
    assert "machine:" in markdown and "litestar" in markdown and "python-socketio" in markdown
    for figure in figures.values():
        assert f"## {figure['title']}" in markdown
        assert figure["rows"], figure["key"]
        assert figure["plots"], figure["key"]
        for name in figure["plots"]:
            assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
            assert f"]({name})" in markdown

    held = values(figures["idle"], "connections held at the top level")
    assert held and all(samples[0] > 0 for samples in held.values()), held
    received = values(figures["throughput"], "tokens received")
    assert set(received) == {"bare websockets", "python-socketio", "tokenwire"}
    assert all(samples and min(samples) > 0 for samples in received.values()), received
    assert "lost: 0, duplicated: 0" in " ".join(figures["throughput"]["notes"])
    received = values(figures["latency"], "tokens received")
    assert set(received) == {
        "bare websockets",
        "python-socketio",
        "tokenwire",
        "tokenwire via Redis",
    }
    assert all(samples and min(samples) > 0 for samples in received.values()), received
    p99 = [r for r in figures["latency"]["rows"] if r["metric"].startswith("p99")]
    assert len(p99) == 4 and all(r["samples"][0] > 0 for r in p99)
    lost = values(figures["resume"], LOST)
    duplicated = values(figures["resume"], DUPLICATED)
    assert set(lost) == set(duplicated) == {"tokenwire", "tokenwire via Redis"}
    assert all(samples == [0] for samples in [*lost.values(), *duplicated.values()])
    cuts = values(figures["resume"], "connection cuts")
    assert all(samples[0] > 0 for samples in cuts.values()), cuts
    cold = values(figures["page_load"], "cold: usable input")
    assert cold["MicroPython"][0] > 0
    assert values(figures["page_load"], "bytes, cold")["MicroPython"][0] > 0


def test_a_missing_figure_module_fails_the_run_clearly(tmp_path: Path) -> None:
    # A figure listed in FIGURES whose module does not exist (patched in, in the child).
    program = (
        "import sys, bench.__main__ as bench; bench.FIGURES += ('nonesuch',); "
        f"sys.exit(bench.main(['--smoke', '--only', 'nonesuch', '--out', {str(tmp_path)!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "figure module(s) missing: bench/nonesuch.py" in result.stderr
    assert not (tmp_path / "results.md").exists()


def test_floors_measure_pacing_and_writes() -> None:
    """`python -m bench.floors` at a tiny size: both floors measured in their own
    processes, at the rate asked for."""
    paced = floors.pacing(streams=20, seconds=0.5)
    assert paced.per_second > 0.5 * 20 * floors.RATE, paced  # tokens flowed at the pace
    assert paced.us_each > 0 and paced.core_share > 0, paced
    written = floors.writes(connections=20, tick=0.01, seconds=0.5)
    assert written.per_second > 0.5 * 20 / 0.01, written  # a frame per connection per tick
    assert written.us_each > 0 and written.core_share > 0, written
    assert "writes, 20 connections every 10 ms" in floors.report(written)
