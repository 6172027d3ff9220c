"""tests/support/log_guard.py: what its scan flags in server logs and what a declaration allows, its
reading of a growing file, the plugin in a pytest run of its own, and a real server that
logs nothing the guard minds."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.server import ROOT, Client, Server, start_chat
from tests.support.log_guard import (
    ERROR_WITH_TRACEBACK,
    Owner,
    _Watched,
    problem_kinds,
    scan,
    split_records,
)

STAMP = "2026-01-02 03:04:05,678"
TRACEBACK = """\
Traceback (most recent call last):
  File "/app/backend/chat.py", line 440, in run
    await provider.stream()
ValueError: upstream said no
"""
CLEAN = (
    f"{STAMP} WARNING uvicorn.error: Invalid HTTP request received.\n"
    f"{STAMP} INFO backend.app: draining: 2 clients [node=a]\n"
    f'{{"time": "2026-01-02T03:04:05.678Z", "level": "WARNING", "logger": "x", "message": "m"}}\n'
    'INFO:     127.0.0.1:5000 - "GET /healthz HTTP/1.1" 200 OK\n'
)


def kinds(text: str, *expected: str) -> list[tuple[str, ...]]:
    return [problem.kinds for problem in scan(text, expected)]


# ---- the scan ------------------------------------------------------------------------------


def test_a_clean_log_has_no_problems() -> None:
    assert kinds(CLEAN) == []
    # An ERROR line alone is not flagged (only one followed by a traceback).
    assert kinds(f"{STAMP} ERROR uvicorn.error: ASGI callable returned without...\n") == []


def test_an_error_line_and_its_traceback_are_one_problem() -> None:
    log = (
        f"{CLEAN}{STAMP} ERROR backend.chat.service: generation g1 failed [request=r1]\n{TRACEBACK}"
    )
    [problem] = scan(log + CLEAN)
    assert problem.kinds == (ERROR_WITH_TRACEBACK,)
    assert problem.record.text == f"{STAMP} ERROR backend.chat.service: generation g1 failed" + (
        f" [request=r1]\n{TRACEBACK}"
    )
    assert problem.record.start == len(CLEAN.encode())


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        pytest.param(
            f"{STAMP} WARNING backend.chat.service: storage unavailable\n{TRACEBACK}",
            ("traceback",),
            id="warning-with-traceback",
        ),
        pytest.param(f"some output\n{TRACEBACK}", ("traceback",), id="bare-traceback"),
        pytest.param(
            json.dumps({"level": "ERROR", "logger": "backend.chat.service", "exc": TRACEBACK})
            + "\n",
            (ERROR_WITH_TRACEBACK,),
            id="json-exc",
        ),
        pytest.param(
            f"ERROR:    Exception in ASGI application\n{TRACEBACK}",
            (ERROR_WITH_TRACEBACK, "exception in ASGI application"),
            id="uvicorn-default-format",
        ),
        pytest.param(
            f"{STAMP} ERROR asyncio: Fatal error on transport\nprotocol: <WireProtocol>\n",
            ("fatal error",),
            id="fatal-error-on-transport",
        ),
        pytest.param(
            f"{STAMP} ERROR asyncio: Fatal error: protocol.data_received() call failed.\n",
            ("fatal error",),
            id="fatal-error-data-received",
        ),
        pytest.param(
            f"{STAMP} ERROR asyncio: Task exception was never retrieved\n"
            f"future: <Task finished name='Task-5' coro=<run()>>\n{TRACEBACK}",
            (ERROR_WITH_TRACEBACK, "task exception never retrieved"),
            id="task-exception",
        ),
        pytest.param(
            f"{STAMP} ERROR asyncio: Exception in callback Loop._read_ready()\n",
            ("exception in callback",),
            id="exception-in-callback",
        ),
        pytest.param(
            f"{STAMP} ERROR asyncio: Unclosed client session\n",
            ("unclosed resource",),
            id="unclosed",
        ),
        pytest.param(
            "/usr/lib/python3.11/asyncio/selector_events.py:864: ResourceWarning: unclosed "
            "transport <_SelectorSocketTransport fd=7>\n",
            ("unclosed resource",),
            id="resource-warning",
        ),
    ],
)
def test_what_is_flagged(log: str, expected: tuple[str, ...]) -> None:
    assert kinds(CLEAN + log + CLEAN) == [expected]


def test_a_declaration_allows_the_records_it_matches_and_no_others() -> None:
    failed = f"{STAMP} ERROR backend.chat.service: generation g1 failed [request=r1]\n{TRACEBACK}"
    other = f"{STAMP} WARNING asyncio: Task exception was never retrieved\n"
    # The regex may match any line of the record: the message line or the traceback's.
    assert kinds(failed + other, r"generation \w+ failed") == [("task exception never retrieved",)]
    assert kinds(failed + other, r"ValueError: upstream said no") == [
        ("task exception never retrieved",)
    ]
    assert kinds(failed + other, r"generation \w+ failed", "never retrieved") == []
    assert kinds(failed, r"KeyError") == [(ERROR_WITH_TRACEBACK,)]


def test_records_split_at_each_log_line_and_count_offsets_from_base() -> None:
    data = f"{STAMP} INFO a: one\n{STAMP} ERROR b: two\n{TRACEBACK}{{}}\ntail".encode()
    records = split_records(data, base=100)
    assert [r.text for r in records] == [
        f"{STAMP} INFO a: one\n",
        f"{STAMP} ERROR b: two\n{TRACEBACK}",
        "{}\ntail",  # "tail" is no log line: it continues the record before
    ]
    assert records[0].start == 100 and records[-1].end == 100 + len(data)
    assert [problem_kinds(r.text) for r in records] == [(), (ERROR_WITH_TRACEBACK,), ()]


# ---- reading a growing file ----------------------------------------------------------------


def test_a_traceback_read_in_two_parts_is_one_problem_reported_once(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    path.write_text(f"{STAMP} ERROR backend.chat.service: generation g1 failed\n")
    watched = _Watched(path, owners=[(0, Owner("test_a"))])
    assert watched.read() == []  # an ERROR line alone: its traceback may still be coming
    with path.open("a") as log:
        log.write(TRACEBACK)
    [(problem, owner)] = watched.read()
    assert problem.kinds == (ERROR_WITH_TRACEBACK,) and owner == Owner("test_a")
    with path.open("a") as log:
        log.write(f"{STAMP} INFO a: later\n")
    assert watched.read() == []


def test_a_record_is_judged_by_the_test_during_which_it_began(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    path.write_text(f"{STAMP} ERROR backend.chat.service: generation g1 failed\n")
    watched = _Watched(path, owners=[(0, Owner("test_a", (re.compile("g1 failed"),)))])
    assert watched.read() == []
    watched.owners.append((watched.size, Owner("test_b")))
    with path.open("a") as log:
        log.write(
            TRACEBACK + f"{STAMP} ERROR backend.chat.service: generation g2 failed\n" + TRACEBACK
        )
    [(problem, owner)] = watched.read()  # g1's traceback is test_a's, and declared
    assert "g2 failed" in problem.record.text and owner == Owner("test_b")


def test_a_server_may_declare_what_it_provokes_in_every_test(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    path.write_text(f"ERROR:    Exception in ASGI application\n{TRACEBACK}")
    expected = (re.compile(r"(?m)^ValueError: upstream said no$"),)
    assert _Watched(path, owners=[(0, Owner("test_a"))], expected=expected).read() == []
    [(problem, _)] = _Watched(path, owners=[(0, Owner("test_a"))]).read()
    assert problem.kinds == (ERROR_WITH_TRACEBACK, "exception in ASGI application")


# ---- the plugin in a run of its own --------------------------------------------------------

CONFTEST = """
from pathlib import Path

LOG = Path(__file__).with_name("server.log")


def pytest_runtest_logreport(report):
    # After test_late_a has ended, before test_late_b begins: a late line of test_late_a.
    if report.when == "teardown" and report.nodeid.endswith("test_late_a"):
        with LOG.open("a") as log:
            log.write("late\\nTraceback (most recent call last):\\nKeyError: 'late'\\n")
"""
TESTS = """
import pytest
from conftest import LOG
from tests.support.log_guard import watch

TRACEBACK = "Traceback (most recent call last):\\n  File 'x', line 1\\nValueError: boom\\n"


@pytest.fixture(scope="module", autouse=True)
def log():
    LOG.write_text("")
    watch(LOG)


def write(text):
    with LOG.open("a") as log:
        log.write(text)


def test_clean():
    write("2026-01-02 03:04:05,678 WARNING backend.app: slow\\n")


def test_traceback():
    write("2026-01-02 03:04:05,678 ERROR backend.chat.service: generation failed\\n" + TRACEBACK)


@pytest.mark.server_log(r"ValueError: boom")
def test_declared():
    write(TRACEBACK)


def test_failing_anyway():
    write(TRACEBACK)
    assert False, "the test's own failure"


def test_late_a():
    pass


def test_late_b():
    pass
"""


def test_the_plugin_reports_problems_as_failures_of_their_tests(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_guarded.py").write_text(textwrap.dedent(TESTS))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [
            *(
                sys.executable,
                "-m",
                "pytest",
                "-p",
                "tests.support.log_guard",
                "-p",
                "no:cacheprovider",
            ),
            *("-rA", "--strict-markers", "test_guarded.py"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = run.stdout
    summary = {
        line.split()[1].split("::")[-1]: line.split()[0]
        for line in out.splitlines()
        if line.split()[:1] in (["PASSED"], ["FAILED"], ["ERROR"])
    }
    assert summary == {
        "test_clean": "PASSED",
        "test_traceback": "FAILED",
        "test_declared": "PASSED",
        "test_failing_anyway": "FAILED",
        "test_late_a": "PASSED",
        "test_late_b": "ERROR",
    }, out
    log = str(tmp_path / "server.log")
    assert f"server log {log}: 1 problem(s)" in out
    assert "> " in out and "ERROR backend.chat.service: generation failed" in out
    assert "server log problems" in out  # a section of test_failing_anyway's failure
    assert "written after test_guarded.py::test_late_a ended" in out


# ---- a real server -------------------------------------------------------------------------


async def test_a_server_serving_a_chat_logs_no_problem(
    make_server: Callable[..., Server],
) -> None:
    server = make_server()
    client = await Client.connect(server)
    stream, _ = await start_chat(client, "hello")
    end = (await client.until_end(stream)).end
    assert end is not None and end["type"] == "done"
    await client.close()
    server.stop(signal.SIGTERM)
    assert scan(server.log_path.read_bytes()) == [], server.log()
