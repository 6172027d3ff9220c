"""A real `redis-server` for tests: started on a free port, stopped and restarted at will.

`RedisServer.stop()` and `start()` reuse the port, so clients configured with `url` see a
restart as a dropped connection and then the same server again (empty: nothing is saved).
The fixtures at the end are shared through conftest.py.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

REDIS_SERVER: Final = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT: Final = 10.0
STOP_TIMEOUT: Final = 5.0
PING_INTERVAL: Final = 0.01


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ping(port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis server answers PING on `port` (a raw RESP exchange, no client)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One `redis-server` process in `directory`, without persistence."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = free_port() if port is None else port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server on `port` and wait until it answers PING."""
        if self.running:
            return
        if not Path(REDIS_SERVER).is_file():
            raise RuntimeError(
                "redis-server is not installed: `apt-get install redis-server` "
                "(`make system-deps` does it)"
            )
        log_path = self.directory / f"redis-{self.port}.log"
        with log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.directory),
                ],
                cwd=self.directory,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not ping(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{tail}")
            time.sleep(PING_INTERVAL)

    def stop(self) -> None:
        """Stop the server (its clients see their connections close); the port is kept."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)


def start_redis(directory: Path, attempts: int = 3) -> RedisServer:
    """A started server on a free port (another port if the one picked was taken meanwhile)."""
    for attempt in range(attempts):
        server = RedisServer(directory)
        try:
            server.start()
        except RuntimeError:
            if attempt == attempts - 1:
                raise
        else:
            return server
    raise AssertionError("unreachable")


def flush(port: int) -> None:
    """Empty every database of the server on `port`."""
    with socket.create_connection(("127.0.0.1", port), timeout=STOP_TIMEOUT) as sock:
        sock.sendall(b"FLUSHALL\r\n")
        if not sock.recv(64).startswith(b"+OK"):
            raise RuntimeError("FLUSHALL failed")


# ---- fixtures (imported by conftest.py) -------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole test session. Do not stop it in a test: use
    `own_redis` for a server of the test's own."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """`redis://127.0.0.1:<port>/0` of the session's server (not emptied between tests:
    use `redis_clean` for that)."""
    return redis_server.url


@pytest.fixture
def redis_clean(redis_server: RedisServer) -> str:
    """The session server's URL, emptied before the test."""
    flush(redis_server.port)
    return redis_server.url


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, that it may stop and start; stopped at the end."""
    server = start_redis(tmp_path)
    yield server
    server.stop()
