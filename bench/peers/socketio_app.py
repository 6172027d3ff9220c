"""What a user would build instead: a minimal python-socketio ASGI app on uvicorn that
streams the demo tokens with one `emit` per token.

    python -m bench.peers.socketio_app --port P [--provider demo|clock] [--tokens-per-second 50]

Events: the client emits `chat` `{"id","text"}`; the server emits `token`
`{"id","seq","data"}` per token, then `done` `{"id","seq","reason"}`. uvicorn runs with its
defaults except the log level (and no per-message deflate, which tokenwire turns off too).
"""

from __future__ import annotations

import asyncio
from typing import Any

import socketio
import uvicorn

from bench.peers import answer, make_provider, peer_arguments


def main() -> None:
    args = peer_arguments(__doc__)
    provider = make_provider(args)
    sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*")
    tasks: set[asyncio.Task[None]] = set()

    async def stream(sid: str, id: str, text: str) -> None:
        seq = 0
        async for token in answer(provider, text):
            seq += 1
            await sio.emit("token", {"id": id, "seq": seq, "data": token}, to=sid)
        await sio.emit("done", {"id": id, "seq": seq, "reason": "stop"}, to=sid)

    @sio.on("chat")  # type: ignore[misc]
    async def chat(sid: str, data: dict[str, Any]) -> None:
        task = asyncio.create_task(stream(sid, data["id"], data["text"]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    app = socketio.ASGIApp(sio)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        ws_per_message_deflate=False,
    )


if __name__ == "__main__":
    main()
