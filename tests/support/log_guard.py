"""A pytest plugin that fails a test when a server it ran logged a problem meanwhile.

The servers the tests start as subprocesses (`harness/server.py`, the wire server of
`tests/integration/test_wsserver.py`) register their log files with `watch(path)`. For each test the
plugin reads what those files gained since it last looked: at the start of the test's
setup (what arrived between two tests), after its call, and after its teardown (when the
fixtures have stopped their servers, so a server's last lines are in). A problem is a log
record (a log line with the lines that continue it, such as a traceback) that contains
one of `PROBLEMS`: any traceback, asyncio's "Fatal error ..." and "Task exception was
never retrieved", "Unclosed ..." (asyncio, aiohttp and ResourceWarning), "Exception in
ASGI application" and so on; an ERROR or CRITICAL line followed by a traceback is named
so. Plain ERROR lines without a traceback are not flagged. Text lines
(`%(asctime)s %(levelname)s ...`, backend/web/logs.py), JSON lines (the traceback is in
`"exc"`) and uvicorn's own `ERROR:    ...` lines are all understood.

A problem fails the phase it was found in: the call of a test that passed becomes a
failure showing the offending records (with context) and the file's path; a failed one
gets them as an extra report section. A record written after a test ended and before
the next one began is reported at the next test's setup, as a late line of the test
before it (a module-scoped server writes asynchronously: a line may land just after the
test that caused it finished). A record is attributed to the test during which it
started, and judged by that test's declarations.

A test that provokes problems on purpose declares them:

    @pytest.mark.server_log(r"generation \\w+ failed", r"ConnectionResetError")

(or `pytestmark = pytest.mark.server_log(...)` for a whole module, or on a class): a
problem record in which one of the regexes finds a match (`re.search` over all its lines,
the message line and its traceback) is allowed. The marker only allows: a test that
expects the lines should also assert that they occurred (`server.log()`). A server whose
own code fails on purpose (the test apps of the wire server) may instead declare those
failures when its log is registered, `watch(path, r"regex", ...)`, for every test.

Limits: only registered files are read (not redis-server's; the in-process fake OpenAI
server of `tests/support/fake_openai.py` logs through pytest's own capture, and fails on purpose);
a line a still-running server writes after the last test of the session is not read; a
record is judged as far as it has been written (a server writes each record at once, but
a record of more than a buffer, 8 KB, may be read half-written: a declaration matching
only its end would not allow it yet); and a log file a test rewrites from the start is
read again from its start.
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest

MARKER: Final = "server_log"

# Problem kinds: what any of these finds in a record makes the record a problem.
PROBLEMS: Final[dict[str, re.Pattern[str]]] = {
    "traceback": re.compile(r"Traceback \(most recent call last\)"),
    "fatal error": re.compile(r"Fatal (?:read |write )?error"),
    "task exception never retrieved": re.compile(r"(?:Task|Future) exception was never retrieved"),
    "task destroyed while pending": re.compile(r"Task was destroyed but it is pending"),
    "unclosed resource": re.compile(r"\b[Uu]nclosed\b|ResourceWarning"),
    "exception in ASGI application": re.compile(r"Exception in ASGI application"),
    "exception in callback": re.compile(r"Exception in callback"),
    "exception ignored": re.compile(r"Exception ignored in"),
}
ERROR_WITH_TRACEBACK: Final = "ERROR with traceback"

# The first line of a log record: backend/web/logs.py's text format (asctime first), its JSON
# format, uvicorn's default format ("ERROR:    ..."); any other line continues a record.
_RECORD_START: Final = re.compile(
    rb"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d|\{|(?:TRACE|DEBUG|INFO|WARNING|ERROR|CRITICAL):\s"
)
_ERROR_LEVEL: Final = re.compile(
    r"\A(?:\S+ \S+ (?:ERROR|CRITICAL) |(?:ERROR|CRITICAL):\s|\{.*\"level\": \"(?:ERROR|CRITICAL)\")"
)
CONTEXT_LINES: Final = 3  # lines shown before and after a problem record
MAX_RECORD_LINES: Final = 40  # a longer record shows its first and last lines only
MAX_SHOWN: Final = 10  # problems shown per file


# ---- scanning (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One log record: its first line and the lines continuing it, as bytes offsets."""

    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Problem:
    record: Record
    kinds: tuple[str, ...]


def split_records(data: bytes, base: int = 0) -> list[Record]:
    """The records of `data` (which must begin at a record's start), with offsets counted
    from `base`. A line that does not begin like a log line continues the record before."""
    records: list[Record] = []
    start = pos = 0
    for line in _lines(data):
        if pos > start and _RECORD_START.match(line):
            records.append(_record(data, start, pos, base))
            start = pos
        pos += len(line)
    if pos > start:
        records.append(_record(data, start, pos, base))
    return records


def _lines(data: bytes) -> Iterator[bytes]:
    """The lines of `data`, each with its b"\\n" (only that ends a line: not a lone b"\\r")."""
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end + 1
        yield data[pos:end]
        pos = end


def _record(data: bytes, start: int, end: int, base: int) -> Record:
    return Record(base + start, base + end, data[start:end].decode(errors="replace"))


def problem_kinds(text: str) -> tuple[str, ...]:
    """What makes the record `text` a problem (nothing: it is not one)."""
    kinds = [name for name, pattern in PROBLEMS.items() if pattern.search(text)]
    if "traceback" in kinds and _ERROR_LEVEL.match(text):
        kinds[kinds.index("traceback")] = ERROR_WITH_TRACEBACK
    return tuple(kinds)


def allowed(text: str, expected: Iterable[re.Pattern[str]]) -> bool:
    return any(pattern.search(text) for pattern in expected)


def scan(
    data: bytes | str, expected: Sequence[str | re.Pattern[str]] = (), base: int = 0
) -> list[Problem]:
    """The problems in the log text `data` that none of the `expected` regexes allows."""
    raw = data.encode() if isinstance(data, str) else data
    patterns = [re.compile(p) for p in expected]
    found = []
    for record in split_records(raw, base):
        kinds = problem_kinds(record.text)
        if kinds and not allowed(record.text, patterns):
            found.append(Problem(record, kinds))
    return found


# ---- the registry of log files -------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """The test during which records were written, and the problems it declared."""

    nodeid: str
    expected: tuple[re.Pattern[str], ...] = ()


@dataclass
class _Watched:
    path: Path
    # Where the next read begins: the start of the last record read (it may still grow).
    cursor: int = 0
    size: int = 0  # the size at the last read
    # Problem records judged (reported or declared): their start, and end when judged.
    judged: dict[int, int] = field(default_factory=dict)
    # (offset, owner): from `offset` on, records start during `owner`'s test.
    owners: list[tuple[int, Owner | None]] = field(default_factory=list)
    expected: tuple[re.Pattern[str], ...] = ()  # allowed in every test (`watch`)

    def owner_at(self, offset: int) -> Owner | None:
        found = self.owners[0][1] if self.owners else None
        for start, owner in self.owners:
            if start > offset:
                break
            found = owner
        return found

    def read(self) -> list[tuple[Problem, Owner | None]]:
        """Problems written since the last read (that their tests did not declare)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.cursor:  # rewritten from the start
            self.cursor, self.judged = 0, {}
        self.size = size
        if size == self.cursor:
            return []
        with self.path.open("rb") as log:
            log.seek(self.cursor)
            data = log.read(size - self.cursor)
        records = split_records(data, self.cursor)
        found = []
        for record in records:
            # A problem record judged already is judged again for what it gained only (the
            # lines of a server's raw stderr output continue the record before them).
            part = record
            if record.start in self.judged:
                start = self.judged[record.start]
                if start >= record.end:
                    continue
                gained = data[start - self.cursor : record.end - self.cursor]
                part = Record(start, record.end, gained.decode(errors="replace"))
            kinds = problem_kinds(part.text)
            if not kinds:
                continue  # (an ERROR line's traceback may be yet to come: judged again then)
            self.judged[record.start] = record.end
            owner = self.owner_at(part.start)
            if not allowed(part.text, (*self.expected, *(owner.expected if owner else ()))):
                found.append((Problem(part, kinds), owner))
        if records:
            self.cursor = records[-1].start
            self.judged = {k: v for k, v in self.judged.items() if k >= self.cursor}
            while len(self.owners) > 1 and self.owners[1][0] <= self.cursor:
                del self.owners[0]
        return found


_watched: dict[Path, _Watched] = {}
_current: Owner | None = None  # the test running now


def watch(path: str | os.PathLike[str], *expected: str) -> None:
    """Read the server log at `path` for problems from now on (its whole content first).
    `expected`: regexes of problems this server provokes on purpose whichever test runs
    (as if every test declared them); keep them as narrow as the marker's."""
    key = Path(path).absolute()
    if key not in _watched:
        patterns = tuple(re.compile(p) for p in expected)
        _watched[key] = _Watched(key, owners=[(0, _current)], expected=patterns)


def _read_all() -> list[tuple[Path, Problem, Owner | None]]:
    return [(w.path, p, o) for w in list(_watched.values()) for p, o in w.read()]


def _begin(owner: Owner) -> None:
    global _current
    _current = owner
    for watched in _watched.values():
        watched.owners.append((watched.size, owner))


# ---- reporting -----------------------------------------------------------------------------


def describe(found: Sequence[tuple[Path, Problem, Owner | None]], nodeid: str) -> str:
    """The failure message: each problem record with context, file by file."""
    parts = []
    by_file: dict[Path, list[tuple[Problem, Owner | None]]] = {}
    for path, problem, owner in found:
        by_file.setdefault(path, []).append((problem, owner))
    for path, problems in by_file.items():
        text = path.read_bytes()
        lines = [line.decode(errors="replace").rstrip("\r") for line in text.split(b"\n")]
        parts.append(f"server log {path}: {len(problems)} problem(s)")
        for problem, owner in problems[:MAX_SHOWN]:
            record = problem.record
            first = text.count(b"\n", 0, record.start)
            last = first + record.text.count("\n") + (not record.text.endswith("\n"))
            when = "" if owner is not None and owner.nodeid == nodeid else _late(owner)
            parts.append(
                f"\nlines {first + 1}-{last}: {', '.join(problem.kinds)}{when}\n"
                + "\n".join(_excerpt(lines, first, last))
            )
        if len(problems) > MAX_SHOWN:
            parts.append(f"\n... and {len(problems) - MAX_SHOWN} more in {path}")
    parts.append(
        f"\nA test that provokes these on purpose declares them: "
        f'@pytest.mark.{MARKER}(r"<regex matching the record>") (see tests/support/log_guard.py).'
    )
    return "\n".join(parts)


def _late(owner: Owner | None) -> str:
    if owner is None:
        return " (written before any test began)"
    return f" (written after {owner.nodeid} ended: a late line of that test)"


def _excerpt(lines: list[str], first: int, last: int) -> Iterator[str]:
    """Lines [first, last) marked with '>', with context; a long record is cut short."""
    shown = list(range(max(0, first - CONTEXT_LINES), min(len(lines), last + CONTEXT_LINES)))
    half = MAX_RECORD_LINES // 2
    for i in shown:
        if first + half <= i < last - half:
            if i == first + half:
                yield f"      ... ({last - first - 2 * half} lines)"
            continue
        yield f"{'>' if first <= i < last else ' '} {i + 1:5} | {lines[i]}"


# ---- the hooks -----------------------------------------------------------------------------

_found_key = pytest.StashKey[list[tuple[Path, Problem, Owner | None]]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(*regexes): the test provokes server log problems (tracebacks, asyncio "
        "errors...) whose records match one of these regexes; tests/support/log_guard.py lets them "
        "pass. It only allows them: a test that expects them should assert they occurred.",
    )


def expected_by(item: pytest.Item) -> tuple[re.Pattern[str], ...]:
    """The regexes of the item's `server_log` markers (its own, its class's, its module's)."""
    patterns: list[re.Pattern[str]] = []
    for mark in item.iter_markers(name=MARKER):
        if mark.kwargs or not mark.args or not all(isinstance(a, str) for a in mark.args):
            raise pytest.UsageError(f"{item.nodeid}: {MARKER} takes regexes: {mark}")
        patterns.extend(re.compile(arg) for arg in mark.args)
    return tuple(patterns)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    item.stash[_found_key] = _read_all()  # what came after the test before ended
    _begin(Owner(item.nodeid, expected_by(item)))
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    found = item.stash.get(_found_key, []) if call.when == "setup" else _read_all()
    if found:
        message = describe(found, item.nodeid)
        if report.failed or hasattr(report, "wasxfail"):
            report.sections.append(("server log problems", message))
        else:
            report.outcome = "failed"
            report.longrepr = message
    return report
