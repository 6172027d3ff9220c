"""Small ASGI apps served by `WireProtocol` for tests/integration/test_wsserver.py, one per
path of `app`:

- `/echo`: plain ASGI; records the connect, echoes text and bytes; "close" closes with 4000
  "bye", "return" returns without closing, "raise" raises (after the accept).
- `/refuse`: closes before the accept. `/noaccept`: returns before the accept. `/raise`:
  raises before the accept.
- `/subprotocol`: accepts with the client's last offered subprotocol and a header of its
  own, then sends what it found in its scope as JSON and echoes like `/echo`.
- `/detach`: accepts, then detaches with `EchoHandler` (`?gate=1`: only once
  `/release?id=` was requested, like an app that awaits something between the two).
- `/pump`: plain ASGI, receiving and sending at once (one task sends binary chunks until
  told "stop"); `/state?id=` says whether its sender is suspended in `send`.

Every connection is named by `?id=`; what its app saw is recorded under that id, served
as JSON by `GET /state?id=` and printed to stdout (a server that has exited still tells).
`GET /healthz` answers with the process id, so a test knows it reached its own server.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any, Final
from urllib.parse import parse_qs

from backend.transports.wsserver import DETACH, Wire

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Any
Send = Any

CHUNK: Final = b"x" * 65536  # what the floods write at a time
FLOOD_CAP: Final = 64 * 1024 * 1024  # a flood stops here even if the wire never fills up
FLOOD_END: Final = "flood-end"

EVENTS: dict[str, list[list[Any]]] = {}
FLAGS: dict[str, dict[str, Any]] = {}
GATES: dict[str, asyncio.Event] = {}
PAUSED: dict[str, Wire] = {}


def record(conn: str, *event: Any) -> None:
    EVENTS.setdefault(conn, []).append(list(event))
    print(json.dumps({"conn": conn, "event": list(event)}), flush=True)


def query(scope: Scope) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await http(scope, send)
        return
    assert scope["type"] == "websocket"
    path = scope["path"]
    conn = query(scope).get("id", "-")
    if path == "/echo":
        await echo(receive, send, conn)
    elif path == "/refuse":
        await receive()
        await send({"type": "websocket.close", "code": 1008})
    elif path == "/noaccept":
        await receive()
    elif path == "/raise":
        await receive()
        raise RuntimeError("refusing by raising")
    elif path.startswith("/subprotocol"):
        await receive()
        offered = scope["subprotocols"]
        await send(
            {
                "type": "websocket.accept",
                "subprotocol": offered[-1] if offered else None,
                "headers": [(b"x-wire", b"yes")],
            }
        )
        headers = dict(scope["headers"])
        seen = {
            "path": path,
            "raw_path": scope["raw_path"].decode(),
            "query_string": scope["query_string"].decode(),
            "subprotocols": offered,
            "scheme": scope["scheme"],
            "client_host": scope["client"][0],
            "x-test": headers.get(b"x-test", b"").decode(),
            "asgi": scope["asgi"],
        }
        await send({"type": "websocket.send", "text": json.dumps(seen)})
        await echo(receive, send, conn, accepted=True)
    elif path == "/detach":
        await receive()
        await send({"type": "websocket.accept"})
        if query(scope).get("gate"):
            gate = GATES.setdefault(conn, asyncio.Event())
            await gate.wait()
        handler = EchoHandler(conn)
        handler.wire = scope[DETACH](handler)
        record(conn, "detached")
    elif path == "/pump":
        await pump(receive, send, conn)
    else:
        await send({"type": "websocket.close"})


async def echo(receive: Receive, send: Send, conn: str, accepted: bool = False) -> None:
    if not accepted:
        record(conn, (await receive())["type"])
        await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            record(conn, "disconnect", message.get("code"))
            return
        text = message.get("text")
        if text == "close":
            await send({"type": "websocket.close", "code": 4000, "reason": "bye"})
        elif text == "return":
            return
        elif text == "raise":
            raise RuntimeError("raising after the accept")
        elif text is not None:
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})


class EchoHandler:
    """A detached connection's handler: echoes text with `Wire.send_texts` and records
    every call it gets. Commands: "close", "many", "pause", "flood"."""

    def __init__(self, conn: str) -> None:
        self.conn = conn
        self.wire: Wire | None = None
        self.flooding = False
        self.written = 0

    def on_text(self, text: str) -> None:
        record(self.conn, "text", text)
        wire = self.wire
        assert wire is not None
        if text == "close":
            wire.close(4000, "bye")
        elif text == "many":
            wire.send_texts([b"one", b"two", "три".encode()])
        elif text == "pause":
            wire.pause_reading()
            PAUSED[self.conn] = wire
            wire.send_texts([b"paused"])
        elif text == "flood":
            self.flooding = True
            self.flood()
        else:
            wire.send_texts([text.encode()])

    def flood(self) -> None:
        wire = self.wire
        assert wire is not None
        while wire.writable and self.written < FLOOD_CAP:
            wire.send_texts([CHUNK])
            self.written += len(CHUNK)
        if self.written >= FLOOD_CAP:
            record(self.conn, "flood-capped", self.written)
            self.flooding = False
            wire.send_texts([FLOOD_END.encode()])
        else:
            record(self.conn, "unwritable", self.written)

    def on_binary(self, data: bytes) -> None:
        record(self.conn, "binary", data.hex())
        assert self.wire is not None
        self.wire.send_texts([f"binary {data.hex()}".encode()])

    def on_writable(self) -> None:
        record(self.conn, "writable", self.written)
        if self.flooding:
            self.flooding = False  # one round of back-pressure is enough to see
            assert self.wire is not None
            self.wire.send_texts([FLOOD_END.encode()])

    def on_closed(self, code: int) -> None:
        record(self.conn, "closed", code)
        PAUSED.pop(self.conn, None)
        self.wire = None


async def pump(receive: Receive, send: Send, conn: str) -> None:
    """Receive while another task sends (as apps with a reader and a writer task do)."""
    await receive()
    await send({"type": "websocket.accept"})
    flags = FLAGS.setdefault(conn, {"in_send": False, "sent": 0, "stop": False})

    async def sender() -> None:
        # Never suspends but in `send`, so `in_send` seen from elsewhere means blocked.
        while not flags["stop"] and flags["sent"] < FLOOD_CAP:
            flags["in_send"] = True
            await send({"type": "websocket.send", "bytes": CHUNK})
            flags["in_send"] = False
            flags["sent"] += len(CHUNK)

    task = asyncio.create_task(sender())
    try:
        message = await receive()
        record(conn, "received", message.get("text"))
        flags["stop"] = True
        await task
        await send({"type": "websocket.send", "text": f"sent {flags['sent']}"})
    finally:
        task.cancel()


async def http(scope: Scope, send: Send) -> None:
    conn = query(scope).get("id", "-")
    path = scope["path"]
    body: Any
    if path == "/healthz":
        body = {"pid": os.getpid()}
    elif path == "/state":
        body = {"events": EVENTS.get(conn, []), **FLAGS.get(conn, {})}
    elif path == "/release":
        GATES.setdefault(conn, asyncio.Event()).set()
        body = {"released": conn}
    elif path == "/resume":
        body = {"events": list(EVENTS.get(conn, []))}  # before the frames resuming lets in
        PAUSED[conn].resume_reading()
    else:
        body = {"error": "not found"}
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})
