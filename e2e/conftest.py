"""Playwright in Debian's Chromium against real tokenwire servers.

Playwright's own browser download cannot work here, so the suite drives
/usr/bin/chromium (installed by `make test`) with the flags FIELD-NOTES.md records:
without the background-networking ones Chromium keeps trying to reach the closed network.
Screenshots of failures (and traces on request: `--tracing on`) land in test-results/.

Every test also fails if the page threw an uncaught error (a Python exception in an event
handler shows up as one): a client that breaks quietly must not pass because the text
still came out right.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page

from harness.server import Server, server_factory

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# A default answer (about 250 tokens) streams in about four seconds at this pace: long
# enough to break the network in the middle of it.
E2E_DEMO = {"demo_first_token_delay": 0.1, "demo_tokens_per_second": 60}


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make test` (it installs Debian's chromium)")
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


@pytest.fixture(autouse=True)
def no_page_errors(page: Page) -> Iterator[None]:
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield
    assert errors == [], "the page threw:\n" + "\n".join(errors)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with server_factory(tmp_path_factory.mktemp("e2e"), **E2E_DEMO) as make:
        yield make()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    with server_factory(tmp_path, **E2E_DEMO) as make:
        yield make
