from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.server import Server, server_factory
from tests.support.fake_openai import upstream  # noqa: F401  (a fixture, shared by several modules)

# A stream of the default demo answer lasts about a second and a half at this pace.
FAST_DEMO = {"demo_first_token_delay": 0.05, "demo_tokens_per_second": 200}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server shared by a module's tests (each test uses its own identity)."""
    with server_factory(tmp_path_factory.mktemp("server"), **FAST_DEMO) as make:
        yield make()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers with settings of the test's own; all are killed at the end."""
    with server_factory(tmp_path, **FAST_DEMO) as make:
        yield make


# A real redis-server for the Redis backends: `redis_url` (one per session), `redis_clean`
# (the same, emptied before the test) and `own_redis` (a server the test may restart).
from harness.redis_server import own_redis, redis_clean, redis_server, redis_url  # noqa: E402, F401
