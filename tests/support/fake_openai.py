"""A fake OpenAI-compatible server: a raw ASGI app under uvicorn, in the test's own event
loop, that speaks the streaming /v1/chat/completions format. The request's `model` picks
the behaviour, including failures mid-stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn

TIMEOUT = 10.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

API_KEY = "sk-test-0123456789abcdef"


def sse_chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    # ensure_ascii=False: send U+2028 raw, as real servers may.
    return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
HELLO = [sse_chunk("Hel"), sse_chunk("lo"), sse_chunk(" wor\u2028ld")]
NORMAL_BODY = [
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n',
    b": keep-alive\n\n",
    *HELLO,
    sse_chunk(None, "stop"),
    b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n',
    DONE,
]


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeOpenAI:
    """Speaks /v1/chat/completions streaming; the request's `model` picks the behaviour."""

    base_url: str = ""
    requests: list[RecordedRequest] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append(RecordedRequest(scope["method"], scope["path"], headers, body))
        model = body["model"]

        async def start(status: int = 200, content_type: bytes = b"text/event-stream") -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", content_type)],
                }
            )

        async def write(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        async def stream(parts: list[bytes], end: bool = True) -> None:
            await start()
            for part in parts:
                await write(part)
            if end:
                await write(b"", more=False)

        async def error(status: int, data: bytes, content_type: bytes) -> None:
            await start(status, content_type)
            await write(data, more=False)

        match model:
            case "normal":
                await stream(NORMAL_BODY)
            case "normal-crlf":
                await stream([part.replace(b"\n", b"\r\n") for part in NORMAL_BODY])
            case "normal-split":
                # Event and line boundaries fall anywhere between network writes.
                whole = b"".join(NORMAL_BODY)
                await stream([whole[i : i + 7] for i in range(0, len(whole), 7)])
            case "length":
                await stream([*HELLO, sse_chunk(None, "length"), DONE])
            case "no-done":
                await stream([*HELLO, sse_chunk(None, "stop")])
            case "cut":
                await stream(HELLO)
            case "abort":
                await stream(HELLO, end=False)
                raise RuntimeError("upstream crashed mid-stream (expected in this test)")
            case "unauthorized":
                upstream_message = f"Incorrect API key provided: {headers.get('authorization', '')}"
                data = {"error": {"message": upstream_message, "type": "invalid_request_error"}}
                await error(401, json.dumps(data).encode(), b"application/json")
            case "long-error":
                data = {"error": {"message": "y" * 5000}}
                await error(400, json.dumps(data).encode(), b"application/json")
            case "html-error":
                await error(502, b"<html>internal secret trace</html>", b"text/html")
            case "malformed":
                await stream([HELLO[0], b'data: {"choices": [\n\n', DONE])
            case "chunk-error":
                await stream([HELLO[0], b'data: {"error": {"message": "model overloaded"}}\n\n'])
            case "stall":
                await stream(HELLO[:1], end=False)
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.disconnected.set()
            case _:
                await error(404, b'{"error": {"message": "unknown model"}}', b"application/json")


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    app = FakeOpenAI()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(TIMEOUT):
            while not server.started:
                if task.done():
                    task.result()  # startup failed: raise its error here
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        app.base_url = f"http://127.0.0.1:{port}/v1"
        yield app
    finally:
        server.should_exit = True
        async with asyncio.timeout(TIMEOUT):
            await task
