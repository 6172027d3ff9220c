"""Test harness: a real tokenwire server in a subprocess, and a WebSocket client that
follows the client rules of PROTOCOL.md while recording everything it saw.

Nothing is mocked: the server is `python -m backend` on a free loopback port, talked to
with the `websockets` library and `httpx`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support.log_guard import watch

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0  # the most any single wait in a test may take


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=TIMEOUT).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.split()
                values[name] = float(value)
        return values

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


class PortTaken(RuntimeError):
    """Another process took the port picked for a server before the server could bind it
    (`free_port` only finds a port free at that moment; many servers start at once)."""


PORT_ATTEMPTS = 3
# A test may serve tokenwire through another module that runs `backend.__main__.main()`
# after setting something up (tests/support/faults.py injects faults): this key of a server's
# environment names it; a restart keeps it.
SERVER_MODULE = "TEST_SERVER_MODULE"


def start_server(tmp: Path, *, module: str = "backend", **env: Any) -> Server:
    """Start `python -m backend` (or `module`, see SERVER_MODULE) with TOKENWIRE_<KEY>=value
    for each keyword; wait for it."""
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        full_env = {
            **os.environ,
            "PORT": str(port),
            "TOKENWIRE_DB": str(tmp / f"history-{port}.db"),
            "TOKENWIRE_SECRET": "test-secret-0123456789abcdef",
            "TOKENWIRE_LOG_LEVEL": "warning",
            SERVER_MODULE: module,
        }
        full_env.update({f"TOKENWIRE_{k.upper()}": str(v) for k, v in env.items()})
        try:
            return _launch(port, full_env, tmp / f"server-{port}.log")
        except PortTaken:
            if attempt == PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def restart(old: Server) -> Server:
    """Start a server like `old`, which must have exited: the same port (a page's origin),
    database, secret (its identity cookie) and settings."""
    if old.proc.poll() is None:
        raise RuntimeError("the old server is still running: stop it first")
    return _launch(old.port, old.env, old.log_path.with_name(old.log_path.stem + "-again.log"))


def _launch(port: int, env: dict[str, str], log_path: Path) -> Server:
    module = env.get(SERVER_MODULE, "backend")
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    server = Server(proc, port, env, log_path)
    # The node's default name (backend/settings.py): a server answering with another name
    # is some other process on the port, and ours is about to fail to bind it.
    node = env.get("TOKENWIRE_NODE", "").strip() or f"{socket.gethostname()}-{proc.pid}"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if "cannot listen on" in server.log():
                raise PortTaken(f"port {port} was taken:\n{server.log()}")
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            response = httpx.get(f"{server.url}/healthz", timeout=1)
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code == 200:
            try:
                answered = response.json().get("node")
            except (ValueError, AttributeError):
                answered = None  # not even a tokenwire server
            if answered == node:
                watch(
                    log_path
                )  # tests/support/log_guard.py fails a test whose servers logged problems
                return server
            server.stop(signal.SIGKILL)
            raise PortTaken(f"port {port} answers as {answered!r}, not as {node!r}")
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not start:\n{server.log()}")


@contextmanager
def server_factory(tmp: Path, **defaults: Any) -> Iterator[Callable[..., Server]]:
    """`make(**settings)` starts a server (with `defaults` under the test's settings);
    every server it started is killed on exit."""
    started: list[Server] = []

    def make(**env: Any) -> Server:
        server = start_server(tmp, **{**defaults, **env})
        started.append(server)
        return server

    try:
        yield make
    finally:
        for server in started:
            server.stop(signal.SIGKILL)


def new_id() -> str:
    return uuid.uuid4().hex


async def start_chat(
    client: Client, text: str, conversation: str | None = None, **extra: Any
) -> tuple[str, str]:
    """Send a new chat and wait for its ack; returns (stream id, conversation)."""
    stream, conversation = new_id(), conversation or new_id()
    await client.send(type="chat", id=stream, conversation=conversation, text=text, **extra)
    ack = await client.until(lambda f: f["type"] in ("ack", "error"))
    assert ack == {"type": "ack", "id": stream, "conversation": conversation}
    return stream, conversation


async def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll `condition` until true; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@dataclass
class StreamView:
    """What a user sees of one stream, kept by PROTOCOL.md's client rules, plus a record of
    every rule the server broke (duplicates and gaps should never reach a client that
    resumes correctly)."""

    text: str = ""
    last: int = 0
    frames: int = 0
    max_n: int = 0
    duplicates: int = 0
    gaps: int = 0
    end: dict[str, Any] | None = None
    # While a `resume` is pending, frames beyond last + 1 are ignored (PROTOCOL.md): live
    # tokens may reach a new connection before the server has read the resume.
    resuming: bool = False

    def apply(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "token":
            n = frame.get("n", 1)
            self.frames += 1
            self.max_n = max(self.max_n, n)
            if frame["seq"] <= self.last:
                self.duplicates += 1
            elif frame["seq"] - n + 1 != self.last + 1:
                self.gaps += 0 if self.resuming else 1
            else:
                self.resuming = False
                self.text += frame["data"]
                self.last = frame["seq"]
        elif frame["type"] in ("done", "error"):
            if self.end is not None:
                self.duplicates += 1
            self.end = frame


@dataclass
class Client:
    """One WebSocket connection; frames are read by `recv` and `until`, never in the
    background, so a test can stop reading to play a slow consumer."""

    ws: ClientConnection
    cookie: str
    hello: dict[str, Any]
    frames: list[dict[str, Any]] = field(default_factory=list)
    streams: dict[str, StreamView] = field(default_factory=dict)

    @classmethod
    async def connect(cls, server: Server, cookie: str | None = None, **kwargs: Any) -> Client:
        headers = kwargs.pop("additional_headers", {})
        if cookie:
            headers["Cookie"] = cookie
        ws = await asyncio.wait_for(
            connect(server.ws_url, additional_headers=headers, **kwargs), TIMEOUT
        )
        if cookie is None:
            set_cookie = ws.response.headers["set-cookie"]
            cookie = set_cookie.split(";", 1)[0]
        hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert hello["type"] == "hello"
        return cls(ws, cookie, hello)

    def view(self, stream: str) -> StreamView:
        return self.streams.setdefault(stream, StreamView())

    async def resume(self, stream: str, seen: StreamView) -> None:
        """Continue showing `seen` (kept by the page) on this connection."""
        self.streams[stream] = seen
        seen.resuming = True
        await self.send(type="resume", id=stream, after=seen.last)

    async def send(self, **frame: Any) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.frames.append(frame)
        if frame.get("id") and frame["type"] in ("token", "done", "error"):
            self.view(frame["id"]).apply(frame)
        if frame["type"] == "ping":
            await self.send(type="pong", t=frame["t"])
        return frame

    async def until(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        """Read frames until one matches; return it."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv()
                if match(frame):
                    return frame

    async def until_end(self, stream: str, timeout: float = TIMEOUT) -> StreamView:
        await self.until(
            lambda f: f["type"] in ("done", "error") and f.get("id") == stream, timeout
        )
        return self.view(stream)

    async def drain_until_closed(self, timeout: float = TIMEOUT) -> int | None:
        """Read until the server closes; the close code the client saw."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None

    async def close(self) -> None:
        await self.ws.close()
