"""The ceiling: a bare `websockets` asyncio server pushing tokenwire-shaped frames, one
frame per token. No protocol beyond that (no log, no resume, no identity), no framework.

    python -m bench.peers.bare_ws --port P [--provider demo|clock] [--tokens-per-second 50]

On connect it sends `{"type":"hello"}`; on `{"type":"chat","id","text"}` it streams
`{"type":"token","id","seq","data"}` then `{"type":"done","id","seq","reason":"stop"}`;
`{"type":"ping","t"}` gets `{"type":"pong","t"}`. Frames are encoded with `json.dumps`,
what a bare server would use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from backend.providers import DemoProvider
from bench.peers import answer, make_provider, peer_arguments

DUMPS = json.JSONEncoder(separators=(",", ":")).encode


async def stream(ws: ServerConnection, provider: DemoProvider, id: str, text: str) -> None:
    seq = 0
    with contextlib.suppress(ConnectionClosed):
        async for token in answer(provider, text):
            seq += 1
            await ws.send(DUMPS({"type": "token", "id": id, "seq": seq, "data": token}))
        await ws.send(DUMPS({"type": "done", "id": id, "seq": seq, "reason": "stop"}))


async def main() -> None:
    args = peer_arguments(__doc__)
    provider = make_provider(args)

    async def handler(ws: ServerConnection) -> None:
        streams: set[asyncio.Task[None]] = set()
        try:
            await ws.send(DUMPS({"type": "hello", "node": "bare"}))
            async for message in ws:
                frame = json.loads(message)
                if frame.get("type") == "chat":
                    task = asyncio.create_task(stream(ws, provider, frame["id"], frame["text"]))
                    streams.add(task)
                    task.add_done_callback(streams.discard)
                elif frame.get("type") == "ping":
                    await ws.send(DUMPS({"type": "pong", "t": frame.get("t")}))
        except ConnectionClosed:
            pass
        finally:
            for task in list(streams):
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)

    # No compression and no library pings: tokenwire runs without either.
    async with serve(
        handler, args.host, args.port, compression=None, ping_interval=None, max_queue=None
    ) as server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop  # the same event loop uvicorn picks for the other peers
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
