"""`WireProtocol` (backend/transports/wsserver.py) as a client sees it: a real uvicorn
process serving the apps of tests/support/wire_apps.py with `--ws ...:WireProtocol` on a free
loopback port.

Well-behaved clients are the `websockets` library's; a raw socket (`Raw`) plays the clients
that break RFC 6455, that never read, that never answer a close or that just drop. What the
apps saw (the ASGI messages, the detached handler's calls) is read from the server over HTTP
(`/state?id=`), or from its output once it has exited.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from backend.transports.wsserver import CLOSE_TIMEOUT
from harness.server import ROOT, TIMEOUT, free_port
from tests.support.log_guard import watch
from tests.support.wire_apps import CHUNK, FLOOD_CAP, FLOOD_END

MAX_SIZE: Final = 4096  # the server's --ws-max-size
QUICK: Final = 5.0  # how long something that should happen at once may take
RFC_KEY: Final = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455, section 1.3
RFC_ACCEPT: Final = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
MASK: Final = b"\x37\xfa\x21\x3d"
# RFC 6455 section 5.2, written out rather than imported from wsframes: the raw client is
# an independent reading of the RFC.
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# ---- the server ----------------------------------------------------------------------------


@dataclass
class WireServer:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events_logged(self, conn: str) -> list[list[Any]]:
        """What the apps recorded for `conn`, from the server's output."""
        lines = (json.loads(line) for line in self.log().splitlines() if line.startswith("{"))
        return [line["event"] for line in lines if line["conn"] == conn]

    async def state(self, conn: str) -> dict[str, Any]:
        return await self.get("/state", conn)

    async def get(self, path: str, conn: str) -> dict[str, Any]:
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as http:
            response = await http.get(f"http://127.0.0.1:{self.port}{path}", params={"id": conn})
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def until_state(
        self, conn: str, condition: Callable[[dict[str, Any]], bool], timeout: float, why: str
    ) -> dict[str, Any]:
        """Poll `/state` until `condition` holds; fail with `why` after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            state = await self.state(conn)
            if condition(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"{why} (state after {timeout} s: {state})")
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(QUICK)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # an app task a test left stuck keeps uvicorn waiting
                self.proc.wait(TIMEOUT)


def start_wire_server(tmp: Path, attempts: int = 3) -> WireServer:
    """uvicorn on a free port, serving `tests.support.wire_apps:app` with WireProtocol."""
    for _ in range(attempts):
        port = free_port()
        log_path = tmp / f"wire-{port}.log"
        command = [
            *(sys.executable, "-m", "uvicorn", "tests.support.wire_apps:app"),
            *("--ws", "backend.transports.wsserver:WireProtocol"),
            *("--host", "127.0.0.1", "--port", str(port)),
            *("--ws-max-size", str(MAX_SIZE), "--lifespan", "off", "--log-level", "info"),
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log_path.open("wb") as out:
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out)
        server = WireServer(proc, port, log_path)
        if _ready(server):
            # tests/support/log_guard.py; the exceptions wire_apps.py raises on purpose are
            # expected.
            watch(log_path, r"(?m)^RuntimeError: (refusing by raising|raising after the accept)$")
            return server
    raise RuntimeError(f"no free port for the wire server after {attempts} attempts")


def _ready(server: WireServer) -> bool:
    """Wait until `server` answers: True, or False if another process took its port first
    (`free_port` only finds a port free at that moment)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            if "address already in use" in server.log().lower():
                return False
            raise RuntimeError(f"the wire server exited:\n{server.log()}")
        try:
            answer = httpx.get(
                f"http://127.0.0.1:{server.port}/healthz", timeout=1, trust_env=False
            )
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        try:
            pid = answer.json().get("pid")
        except ValueError:
            pid = None
        if pid == server.proc.pid:
            return True
        server.proc.kill()  # some other process answers on this port
        server.proc.wait(TIMEOUT)
        return False
    server.proc.kill()
    server.proc.wait(TIMEOUT)
    raise RuntimeError(f"the wire server did not start:\n{server.log()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WireServer]:
    started = start_wire_server(tmp_path_factory.mktemp("wire"))
    try:
        yield started
    finally:
        started.stop()


def new_conn() -> str:
    return uuid.uuid4().hex[:12]


def ws_connect(server: WireServer, path: str, **kwargs: Any) -> connect:
    options = {"open_timeout": TIMEOUT, "close_timeout": TIMEOUT, "proxy": None, **kwargs}
    return connect(server.ws_url(path), **options)


async def recv(ws: ClientConnection) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), TIMEOUT)


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """Read until the server closes; the code and reason of its close frame."""
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(TIMEOUT):
            while True:
                await ws.recv()
    assert closed.value.rcvd is not None, "the server dropped the connection without a close"
    return closed.value.rcvd.code, closed.value.rcvd.reason


def closes(code: int) -> Callable[[dict[str, Any]], bool]:
    """A detached handler's `on_closed(code)` was called."""
    return lambda state: ["closed", code] in state["events"]


def plain_closed(code: int) -> Callable[[dict[str, Any]], bool]:
    """The plain app's `receive` gave the connect, then the disconnect with `code`."""
    return lambda state: state["events"] == [["websocket.connect"], ["disconnect", code]]


# ---- a raw client --------------------------------------------------------------------------


def client_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    masked: bool = True,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """A client frame as RFC 6455 section 5.2 lays it out (`length`: the header's, if it
    should say something else than the payload's)."""
    n = len(payload) if length is None else length
    head = bytes(((0x80 if fin else 0) | rsv << 4 | opcode,))
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes((mask_bit | n,))
    elif n < 65536:
        head += bytes((mask_bit | 126,)) + struct.pack("!H", n)
    else:
        head += bytes((mask_bit | 127,)) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class Raw:
    """A WebSocket client on a bare socket: it sends whatever bytes a test makes and reads
    only when told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    @asynccontextmanager
    async def open(cls, server: WireServer, rcvbuf: int | None = None) -> AsyncIterator[Raw]:
        sock = socket.socket()
        if rcvbuf is not None:  # before connecting: it bounds the window the server sees
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(TIMEOUT):
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
                reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        raw = cls(reader, writer)
        try:
            yield raw
        finally:
            writer.transport.abort()

    async def request(
        self,
        path: str,
        *,
        version: bytes | None = b"13",
        key: bytes | None = RFC_KEY,
        extra: tuple[bytes, ...] = (),
    ) -> Response:
        lines = [
            b"GET " + path.encode() + b" HTTP/1.1",
            b"Host: 127.0.0.1",
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            *([b"Sec-WebSocket-Version: " + version] if version is not None else []),
            *([b"Sec-WebSocket-Key: " + key] if key is not None else []),
            *extra,
        ]
        self.writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").strip().split("\r\n")
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return Response(int(status_line.split()[1]), headers, body)

    async def handshake(self, path: str) -> None:
        response = await self.request(path)
        assert response.status == 101, response

    def send(self, opcode: int, payload: bytes = b"", **kwargs: Any) -> None:
        self.writer.write(client_frame(opcode, payload, **kwargs))

    def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_frame(self) -> tuple[bool, int, bytes]:
        async with asyncio.timeout(TIMEOUT):
            first, second = await self.reader.readexactly(2)
            assert not first & 0x70, "server frames set no reserved bit"
            assert not second & 0x80, "server frames are never masked"
            n = second & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return bool(first & 0x80), first & 0x0F, await self.reader.readexactly(n)

    async def read_message(self) -> tuple[int, bytes]:
        fin, opcode, payload = await self.read_frame()
        assert fin, "the server sends each message in one frame"
        return opcode, payload

    async def read_close(self) -> tuple[int, str]:
        """The server's next frame must be a close: its code and reason."""
        opcode, payload = await self.read_message()
        assert opcode == OP_CLOSE, (opcode, payload[:80])
        (code,) = struct.unpack("!H", payload[:2])
        return code, payload[2:].decode()

    async def until_eof(self, timeout: float = TIMEOUT) -> None:
        """Wait for the server to close the TCP connection (a FIN or a reset)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except ConnectionResetError:
            pass


# ---- the opening handshake -----------------------------------------------------------------


async def test_handshake_answers_the_key(server: WireServer) -> None:
    async with Raw.open(server) as raw:
        response = await raw.request("/echo")
        assert response.status == 101
        assert response.headers["upgrade"].lower() == "websocket"
        assert response.headers["connection"].lower() == "upgrade"
        assert response.headers["sec-websocket-accept"] == RFC_ACCEPT.decode()
        assert "sec-websocket-extensions" not in response.headers  # deflate is never agreed
        raw.send(OP_TEXT, b"hi")
        assert await raw.read_message() == (OP_TEXT, b"hi")


HANDSHAKE_REFUSALS: list[tuple[str, dict[str, Any], int]] = [
    ("version-8", {"version": b"8"}, 426),
    ("no-version", {"version": None}, 426),
    ("no-key", {"key": None}, 400),
    ("key-not-base64", {"key": b"not base64 at all!"}, 400),
    ("key-of-8-bytes", {"key": base64.b64encode(b"12345678")}, 400),
]


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [case[1:] for case in HANDSHAKE_REFUSALS],
    ids=[case[0] for case in HANDSHAKE_REFUSALS],
)
async def test_bad_handshake_is_refused(
    server: WireServer, kwargs: dict[str, Any], status: int
) -> None:
    conn = new_conn()
    async with Raw.open(server) as raw:
        response = await raw.request(f"/echo?id={conn}", **kwargs)
        assert response.status == status
        if status == 426:
            assert response.headers["sec-websocket-version"] == "13"
        assert response.headers["connection"] == "close"
        await raw.until_eof()
    assert (await server.state(conn))["events"] == [], "the app is not called"


@pytest.mark.parametrize(
    ("path", "status"),
    [("/refuse", 403), ("/noaccept", 500), ("/raise", 500)],
    ids=["close-before-accept", "return-before-accept", "raise-before-accept"],
)
async def test_app_refusing_the_upgrade(server: WireServer, path: str, status: int) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(server, path):
            pass
    assert refused.value.response.status_code == status


async def test_accept_with_subprotocol_and_headers(server: WireServer) -> None:
    conn = new_conn()
    async with ws_connect(
        server,
        f"/subprotocol/a%20b?id={conn}&x=1",
        subprotocols=[Subprotocol("chat.v2"), Subprotocol("chat.v1")],
        additional_headers={"X-Test": "hi"},
    ) as ws:
        assert ws.subprotocol == "chat.v1"
        assert ws.response is not None
        assert ws.response.headers["x-wire"] == "yes"
        seen = json.loads(await recv(ws))
        assert seen == {
            "path": "/subprotocol/a b",
            "raw_path": "/subprotocol/a%20b",
            "query_string": f"id={conn}&x=1",
            "subprotocols": ["chat.v2", "chat.v1"],
            "scheme": "ws",
            "client_host": "127.0.0.1",
            "x-test": "hi",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
        }
        await ws.send("still open")
        assert await recv(ws) == "still open"


# ---- the plain ASGI mode -------------------------------------------------------------------


async def test_plain_echo(server: WireServer) -> None:
    conn = new_conn()
    async with ws_connect(server, f"/echo?id={conn}") as ws:
        messages: list[str | bytes] = ["hello", "héllo ✓ 🙂", "", "x" * MAX_SIZE, b"\x00\xff", b""]
        for message in messages:
            await ws.send(message)
            assert await recv(ws) == message
    await server.until_state(conn, plain_closed(1000), QUICK, "the app hears the close")


async def test_plain_app_closes_with_its_code(server: WireServer) -> None:
    conn = new_conn()
    async with ws_connect(server, f"/echo?id={conn}") as ws:
        await ws.send("close")
        assert await closed_with(ws) == (4000, "bye")
    # The client answered the close with its code: the app's `receive` says so.
    await server.until_state(conn, plain_closed(4000), QUICK, "the app hears the answer")


@pytest.mark.parametrize(
    ("command", "code"), [("return", 1000), ("raise", 1011)], ids=["returns", "raises"]
)
async def test_plain_app_ending_closes(server: WireServer, command: str, code: int) -> None:
    async with ws_connect(server, "/echo") as ws:
        await ws.send("ping?")
        assert await recv(ws) == "ping?"
        await ws.send(command)
        assert (await closed_with(ws))[0] == code


async def test_client_close_code_is_echoed_and_reaches_the_app(server: WireServer) -> None:
    conn = new_conn()
    async with ws_connect(server, f"/echo?id={conn}") as ws:
        await ws.close(4321, "done")
        assert ws.close_code == 4321  # the server's answering close
    await server.until_state(conn, plain_closed(4321), QUICK, "the app hears 4321")


async def test_plain_send_waits_while_a_reader_is_slow_and_receive_still_works(
    server: WireServer,
) -> None:
    """An app that receives in one task and sends in another (the usual shape): `send` must
    wait while the client reads nothing (memory stays bounded), and meanwhile `receive`
    must still get what the client sends."""
    conn = new_conn()
    async with Raw.open(server, rcvbuf=16384) as raw:
        await raw.handshake(f"/pump?id={conn}")
        blocked = await server.until_state(
            conn,
            lambda s: s.get("in_send") is True,
            TIMEOUT,
            "send never waited for the slow reader",
        )
        assert blocked["sent"] < FLOOD_CAP
        raw.send(OP_TEXT, b"stop")
        await server.until_state(
            conn,
            lambda s: ["received", "stop"] in s["events"],
            QUICK,
            "BUG: the app's `receive` never returned the client's message while its `send` "
            "waited for the transport to drain (WireProtocol._waiting holds one future: the "
            "second waiter replaces the first, which is never woken)",
        )
        received = 0
        while True:
            opcode, payload = await raw.read_message()
            if opcode != OP_BINARY:
                break
            received += len(payload)
        assert (opcode, payload) == (OP_TEXT, f"sent {received}".encode())
        assert await raw.read_close() == (1000, "")


async def test_close_not_answered_is_dropped_after_close_timeout(server: WireServer) -> None:
    async with Raw.open(server) as raw:
        await raw.handshake("/echo")
        raw.send(OP_TEXT, b"close")
        assert await raw.read_close() == (4000, "bye")
        started = time.monotonic()
        await raw.until_eof(CLOSE_TIMEOUT + QUICK)
        waited = time.monotonic() - started
    # The server waits for the client's answer, but only so long.
    assert CLOSE_TIMEOUT - 0.5 <= waited <= CLOSE_TIMEOUT + QUICK


# ---- RFC 6455 on the wire, in both modes ---------------------------------------------------

MODES = ["/echo", "/detach"]


@pytest.mark.parametrize("path", MODES, ids=["plain", "detached"])
async def test_ping_is_answered_with_its_payload(server: WireServer, path: str) -> None:
    async with Raw.open(server) as raw:
        await raw.handshake(path)
        raw.send(OP_PING, b"are you there?")
        assert await raw.read_message() == (OP_PONG, b"are you there?")
        raw.send(OP_PING)
        assert await raw.read_message() == (OP_PONG, b"")
        raw.send(OP_PONG, b"unsolicited")  # ignored (RFC 6455 5.5.3)
        raw.send(OP_TEXT, b"after")
        assert await raw.read_message() == (OP_TEXT, b"after")


@pytest.mark.parametrize("path", MODES, ids=["plain", "detached"])
async def test_fragmented_text_with_a_ping_between(server: WireServer, path: str) -> None:
    whole = "fragmented é ✓".encode()
    cut = whole.index("é".encode()) + 1  # inside a character: only the message must be UTF-8
    async with Raw.open(server) as raw:
        await raw.handshake(path)
        raw.send(OP_TEXT, whole[:cut], fin=False)
        raw.send(OP_PING, b"between")
        raw.send(OP_CONT, whole[cut:-3], fin=False)
        raw.send(OP_CONT, b"", fin=False)
        raw.send(OP_CONT, whole[-3:])
        assert await raw.read_message() == (OP_PONG, b"between")
        assert await raw.read_message() == (OP_TEXT, whole)


async def test_fragmented_binary_is_echoed_whole(server: WireServer) -> None:
    async with Raw.open(server) as raw:
        await raw.handshake("/echo")
        raw.send(OP_BINARY, b"\x00\x01", fin=False)
        raw.send(OP_CONT, b"\x02" * 2000, fin=False)
        raw.send(OP_CONT, b"\xff")
        assert await raw.read_message() == (OP_BINARY, b"\x00\x01" + b"\x02" * 2000 + b"\xff")


CLIENT_CLOSES: list[tuple[str, bytes, int]] = [
    ("4321", close_payload(4321, "done"), 4321),
    ("1000", close_payload(1000), 1000),
    ("1001", close_payload(1001), 1001),
    ("no-code", b"", 1000),  # 1005 is never sent: the answer is 1000
]


@pytest.mark.parametrize(
    ("payload", "answer"),
    [case[1:] for case in CLIENT_CLOSES],
    ids=[case[0] for case in CLIENT_CLOSES],
)
@pytest.mark.parametrize("path", MODES, ids=["plain", "detached"])
async def test_client_close_is_echoed(
    server: WireServer, path: str, payload: bytes, answer: int
) -> None:
    async with Raw.open(server) as raw:
        await raw.handshake(path)
        raw.send(OP_CLOSE, payload)
        assert (await raw.read_close())[0] == answer
        await raw.until_eof()


VIOLATIONS: list[tuple[str, bytes, int]] = [
    ("unmasked", client_frame(OP_TEXT, b"hi", masked=False), 1002),
    ("reserved-bit", client_frame(OP_TEXT, b"hi", rsv=4), 1002),
    ("unknown-opcode", client_frame(0x3, b"hi"), 1002),
    ("ping-over-125", client_frame(OP_PING, b"p" * 126), 1002),
    ("fragmented-ping", client_frame(OP_PING, b"p", fin=False), 1002),
    ("continuation-alone", client_frame(OP_CONT, b"hi"), 1002),
    (
        "text-inside-a-message",
        client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_TEXT, b"b"),
        1002,
    ),
    ("close-code-one-byte", client_frame(OP_CLOSE, b"\x03"), 1002),
    ("close-code-1005", client_frame(OP_CLOSE, close_payload(1005)), 1002),
    ("close-code-999", client_frame(OP_CLOSE, close_payload(999)), 1002),
    ("invalid-utf8", client_frame(OP_TEXT, b"caf\xc3"), 1007),
    (
        "invalid-utf8-fragmented",
        client_frame(OP_TEXT, b"ok", fin=False) + client_frame(OP_CONT, b"\xff"),
        1007,
    ),
    ("close-reason-not-utf8", client_frame(OP_CLOSE, close_payload(1000) + b"\xff"), 1007),
    # Only the header of an oversized frame: the server must not wait for its payload.
    ("over-max-size", client_frame(OP_TEXT, length=MAX_SIZE + 1)[:-4], 1009),
    (
        "over-max-size-in-fragments",
        client_frame(OP_BINARY, b"a" * (MAX_SIZE - 10), fin=False)
        + client_frame(OP_CONT, b"b" * 11),
        1009,
    ),
]


@pytest.mark.parametrize(
    ("data", "code"), [case[1:] for case in VIOLATIONS], ids=[case[0] for case in VIOLATIONS]
)
async def test_protocol_violation_closes_with_its_code(
    server: WireServer, data: bytes, code: int
) -> None:
    async with Raw.open(server) as raw:
        await raw.handshake("/echo")
        raw.send(OP_TEXT, b"before")
        assert await raw.read_message() == (OP_TEXT, b"before")
        raw.send_bytes(data)
        assert (await raw.read_close())[0] == code
        await raw.until_eof()


# ---- the detached mode ---------------------------------------------------------------------


async def test_detached_echo_and_events(server: WireServer) -> None:
    conn = new_conn()
    async with ws_connect(server, f"/detach?id={conn}") as ws:
        await ws.send("hello")
        assert await recv(ws) == "hello"
        await ws.send("many")  # three frames in one write, in order
        assert [await recv(ws) for _ in range(3)] == ["one", "two", "три"]
        await ws.send(b"\x01\x02")
        assert await recv(ws) == "binary 0102"
        await ws.close(4321, "done")
        assert ws.close_code == 4321
    state = await server.until_state(conn, closes(4321), QUICK, "on_closed(4321)")
    assert state["events"] == [
        ["detached"],
        ["text", "hello"],
        ["text", "many"],
        ["binary", "0102"],
        ["closed", 4321],
    ]


async def test_detached_wire_close(server: WireServer) -> None:
    conn = new_conn()
    async with ws_connect(server, f"/detach?id={conn}") as ws:
        await ws.send("close")
        assert await closed_with(ws) == (4000, "bye")
    # The client answered with 4000; on_closed comes once, with the answer's code.
    state = await server.until_state(conn, closes(4000), QUICK, "on_closed(4000)")
    assert [e for e in state["events"] if e[0] == "closed"] == [["closed", 4000]]


async def test_detached_drop_is_1006(server: WireServer) -> None:
    conn = new_conn()
    async with Raw.open(server) as raw:
        await raw.handshake(f"/detach?id={conn}")
        raw.send(OP_TEXT, b"hi")
        assert await raw.read_message() == (OP_TEXT, b"hi")
    # `Raw.open` aborted the socket: no close frame.
    state = await server.until_state(conn, closes(1006), QUICK, "on_closed(1006) after a drop")
    assert [e for e in state["events"] if e[0] == "closed"] == [["closed", 1006]]


async def test_detached_violation_reports_its_code(server: WireServer) -> None:
    conn = new_conn()
    async with Raw.open(server) as raw:
        await raw.handshake(f"/detach?id={conn}")
        raw.send(OP_TEXT, b"\xff\xfe")
        assert (await raw.read_close())[0] == 1007
        await raw.until_eof()
    state = await server.until_state(conn, closes(1007), QUICK, "on_closed(1007)")
    assert state["events"] == [["detached"], ["closed", 1007]]


async def test_detached_pause_and_resume_reading(server: WireServer) -> None:
    conn = new_conn()
    async with ws_connect(server, f"/detach?id={conn}") as ws:
        await ws.send("pause")
        assert await recv(ws) == "paused"
        await ws.send("while paused")
        # `/resume` answers with what the handler got before it resumes reading.
        before = await server.get("/resume", conn)
        assert before["events"] == [["detached"], ["text", "pause"]]
        assert await recv(ws) == "while paused"


async def test_detached_writer_sees_back_pressure(server: WireServer) -> None:
    """A client that reads nothing: `Wire.writable` turns False before the server has
    buffered much, and `on_writable` follows once the client reads again."""
    conn = new_conn()
    async with Raw.open(server, rcvbuf=16384) as raw:
        await raw.handshake(f"/detach?id={conn}")
        raw.send(OP_TEXT, b"flood")
        state = await server.until_state(
            conn,
            lambda s: any(e[0] in ("unwritable", "flood-capped") for e in s["events"]),
            TIMEOUT,
            "the flood never stopped",
        )
        (written,) = [e[1] for e in state["events"] if e[0] in ("unwritable", "flood-capped")]
        assert ["unwritable", written] in state["events"], (
            f"Wire.writable stayed True for {written} bytes to a client that reads nothing"
        )
        received = 0
        while True:
            opcode, payload = await raw.read_message()
            assert opcode == OP_TEXT
            if payload == FLOOD_END.encode():
                break
            assert payload == CHUNK
            received += len(payload)
        assert received == written
    await server.until_state(
        conn, lambda s: ["writable", written] in s["events"], QUICK, "on_writable after reading"
    )


async def test_detach_keeps_messages_that_came_before_it(server: WireServer) -> None:
    """An app that awaits something between `websocket.accept` and detaching (tokenwire's
    own subscribes to its delivery first) must not lose what the client sent meanwhile."""
    conn = new_conn()
    async with ws_connect(server, f"/detach?id={conn}&gate=1", close_timeout=QUICK) as ws:
        await ws.send("early")  # reaches the server before the request that releases the app
        await server.get("/release", conn)
        await server.until_state(
            conn, lambda s: ["detached"] in s["events"], QUICK, "the app never detached"
        )
        await ws.send("later")
        try:
            echoed = [await asyncio.wait_for(ws.recv(), QUICK) for _ in range(2)]
        except TimeoutError:
            echoed = None
        state = await server.state(conn)
        assert echoed == ["early", "later"], (
            "a message received between the accept and `detach` must reach the handler, and "
            f"reading must go on (handler saw {state['events']})"
        )


async def test_detach_after_the_client_closed(server: WireServer) -> None:
    """The client closes while the app is still on its way to `detach`: the handler hears
    of it at once, with the client's code (WireHandler.on_closed: "the client's close code,
    or 1006 for a drop")."""
    conn = new_conn()
    async with ws_connect(server, f"/detach?id={conn}&gate=1") as ws:
        await ws.close(4321, "gone")
        assert ws.close_code == 4321
    await server.get("/release", conn)
    state = await server.until_state(
        conn, lambda s: ["detached"] in s["events"], QUICK, "the app never detached"
    )
    assert [e for e in state["events"] if e[0] == "closed"] == [["closed", 4321]]


# ---- shutdown ------------------------------------------------------------------------------


async def test_shutdown_closes_open_connections_with_1012(tmp_path: Path) -> None:
    own = start_wire_server(tmp_path)
    plain, detached = new_conn(), new_conn()
    try:
        async with (
            ws_connect(own, f"/echo?id={plain}") as plain_ws,
            ws_connect(own, f"/detach?id={detached}") as detached_ws,
        ):
            for ws in (plain_ws, detached_ws):
                await ws.send("open?")
                assert await recv(ws) == "open?"
            own.proc.send_signal(signal.SIGTERM)
            assert await closed_with(plain_ws) == (1012, "server restarting")
            assert await closed_with(detached_ws) == (1012, "server restarting")
        # uvicorn shuts down gracefully, then dies of the signal it caught (as it should).
        assert await asyncio.to_thread(own.proc.wait, TIMEOUT) == -signal.SIGTERM
    finally:
        own.stop()
    assert "Finished server process" in own.log()
    assert own.events_logged(plain) == [["websocket.connect"], ["disconnect", 1012]]
    assert [e for e in own.events_logged(detached) if e[0] == "closed"] == [["closed", 1012]]
