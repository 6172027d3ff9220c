"""`python -m tests.support.faults`: tokenwire exactly as `python -m backend` serves it, with bugs
planted where only a bug could fail, for tests/integration/test_containment.py.

A contained failure is a bug of our own code, so no real input provokes one (the fuzz
proves that much); to see what containment does, a few are planted here, each triggered by
a marker only a test sends:

- a chat whose text is FRAME_FAULT: starting it raises (as a bug in the chat service
  would), on every transport;
- a stream whose id starts with CONNECTION_FAULT: encoding any of its frames for a
  WebSocket raises (as a bug in the connection's writing would);
- a stream whose id starts with SSE_FAULT: encoding its token events for SSE raises;
- a stream whose id starts with FILL_FAULT: reading it from its log raises (as a bug in
  a client's catch-up would).

Nothing else changes: the server, its settings and every other request are the real ones.
"""

from __future__ import annotations

import sys
from typing import Any, Final

import backend.transports.sse as sse
import backend.transports.websocket as websocket
from backend.__main__ import main
from backend.chat.service import ChatService
from backend.protocol import TokenFrame

FRAME_FAULT: Final = "plant a fault in this frame"
CONNECTION_FAULT: Final = "faultconn"
SSE_FAULT: Final = "faultsse"
FILL_FAULT: Final = "faultfill"


class PlantedFault(RuntimeError):
    """What a planted bug raises."""


def _plant() -> None:
    start = ChatService.start

    async def faulty_start(
        self: ChatService, user: str, id: str, conversation: str, text: str, **kwargs: Any
    ) -> Any:
        if text == FRAME_FAULT:
            raise PlantedFault("a planted bug in ChatService.start")
        return await start(self, user, id, conversation, text, **kwargs)

    ChatService.start = faulty_start  # type: ignore[method-assign]
    read_after = ChatService.read_after

    async def faulty_read(self: ChatService, user: str, stream: str, *args: Any) -> Any:
        if stream.startswith(FILL_FAULT):
            raise PlantedFault("a planted bug in ChatService.read_after")
        return await read_after(self, user, stream, *args)

    ChatService.read_after = faulty_read  # type: ignore[method-assign]

    def failing(encoder: Any, prefix: str) -> Any:
        def encode(frame: Any) -> Any:
            if str(getattr(frame, "id", "")).startswith(prefix):
                raise PlantedFault(f"a planted bug encoding a frame of {prefix}...")
            return encoder(frame)

        return encode

    websocket.encode = failing(websocket.encode, CONNECTION_FAULT)
    websocket.encode_text = failing(websocket.encode_text, CONNECTION_FAULT)
    frame_event = sse.frame_event

    def faulty_event(frame: Any) -> Any:
        if isinstance(frame, TokenFrame) and frame.id.startswith(SSE_FAULT):
            raise PlantedFault("a planted bug writing an SSE event")
        return frame_event(frame)

    sse.frame_event = faulty_event


if __name__ == "__main__":
    _plant()
    sys.exit(main())
