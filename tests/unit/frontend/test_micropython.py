"""The browser core's tests under MicroPython 1.27, the page's default interpreter.

tests/unit/frontend/run_micropython.mjs runs every tests/unit/frontend/test_core_*.py in Node
against the pinned @micropython/micropython-webassembly-pyscript package; the same files also
run here under CPython. A missing package is a failure, not a skip: CI must run these.
"""

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
RUNNER = ROOT / "tests" / "unit" / "frontend" / "run_micropython.mjs"
MICROPYTHON = (
    ROOT / "frontend" / "node_modules" / "@micropython" / "micropython-webassembly-pyscript"
)
TIMEOUT = 120.0
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$", re.MULTILINE)


def test_core_tests_pass_under_micropython() -> None:
    assert (MICROPYTHON / "micropython.mjs").is_file(), (
        f"MicroPython is not installed in {MICROPYTHON}: run `npm ci --prefix frontend`"
    )
    node = shutil.which("node")
    assert node, "Node.js (20 or later) is needed to run the MicroPython tests: install nodejs"
    try:
        result = subprocess.run(
            [node, str(RUNNER)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        raise AssertionError(
            f"the MicroPython tests took over {TIMEOUT:.0f} s\n"
            f"stdout:\n{expired.stdout!r}\nstderr:\n{expired.stderr!r}"
        ) from None
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    summaries = SUMMARY.findall(result.stdout)
    assert summaries, f"no 'N passed, M failed' line\n{report}"
    passed, failed = (int(n) for n in summaries[-1])
    assert failed == 0 and passed > 0, report
    assert result.returncode == 0, report
