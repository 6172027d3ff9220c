"""`python -m backend`: serve tokenwire with uvicorn, configured from the environment.

Used by `make run` and the Procfile. It runs uvicorn programmatically for the shutdown: on
SIGTERM, uvicorn would close open WebSockets with 1012 before the app hears of it, but
PROTOCOL.md promises 1001 ("reconnect at once"), and running answers should finish rather
than be cut. So the server drains first, within TOKENWIRE_SHUTDOWN_TIMEOUT: it stops
accepting connections, closes idle keep-alive HTTP connections, lets the app tell its
clients 1001 and finish its generations (`Runtime.drain`), and only then runs uvicorn's own
shutdown, bounded by what is left of the grace period.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import socket
import sys
from typing import Final

import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from backend.app import create_app
from backend.runtime import Runtime
from backend.settings import Settings, SettingsError
from backend.transports.wsserver import WireProtocol
from backend.web.logs import setup as setup_logging

log = logging.getLogger(__name__)

# uvicorn's own shutdown after the drain waits at least this long for connections that are
# closing at that moment (a close frame in flight), even if the grace period is spent.
MIN_FINAL_WAIT: Final = 1
FORCE_EXIT_POLL: Final = 0.1  # seconds; how soon a second Ctrl+C cuts the drain short
# The collector's thresholds (CPython's default is 700, 10, 10). Each connection is ~100
# long-lived objects: with the default, opening thousands of connections runs collection
# after collection over all of them (FIELD-NOTES: half the CPU of a 19k connection storm).
GC_THRESHOLDS: Final = (50_000, 20, 100)


class TokenwireServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # What start-up made (modules, the app, its routes) lives as long as the process:
        # frozen out of the collector's sight, no collection walks it again.
        gc.freeze()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        grace = self.runtime.settings.shutdown_timeout
        deadline = loop.time() + grace
        # Stop accepting first: a client told to go away must land on another node (or
        # find this one gone), never back here. Idle keep-alive connections close too; a
        # response in progress (an SSE stream) closes its connection when it ends.
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            if not isinstance(connection, WebSocketsSansIOProtocol | WireProtocol):
                connection.shutdown()
        drain = asyncio.create_task(self.runtime.drain(grace), name="drain")
        while not drain.done():
            await asyncio.wait({drain}, timeout=FORCE_EXIT_POLL)
            if self.force_exit:
                # A second Ctrl+C: uvicorn's "force quit". Its own shutdown then skips every
                # wait and the app's (whatever is still generating is cut, unsaved).
                drain.cancel()
        await asyncio.wait({drain})
        if not drain.cancelled() and (error := drain.exception()) is not None:
            log.error("the drain failed; shutting down without it", exc_info=error)
        self.config.timeout_graceful_shutdown = max(
            MIN_FINAL_WAIT, math.ceil(deadline - loop.time())
        )
        await super().shutdown(sockets)


def listen_socket(settings: Settings) -> socket.socket:
    """The listening socket, made here so its kernel send buffer can be set: accepted
    connections inherit it. Left to the kernel, a socket that a client stops reading grows
    its buffer to megabytes, unbounded by the outbox; with a fixed size, a slow client soon
    blocks our sends, the outbox fills, and PROTOCOL.md's 4001 applies."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if settings.send_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.send_buffer_bytes)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise SettingsError(
            f"cannot listen on {settings.host}:{settings.port} ({exc.strerror}); "
            "set PORT or TOKENWIRE_HOST to a free address"
        ) from None
    sock.set_inheritable(True)
    return sock


def main() -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"tokenwire: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    try:
        sock = listen_socket(settings)
    except SettingsError as exc:
        print(f"tokenwire: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # uvicorn's loggers (its access log too) go through `backend.web.logs`' handler.
        log_config=None,
        # Either is left open by `TokenwireServer.shutdown` for the drain to close with 1001.
        ws=WireProtocol if settings.websocket_server == "wire" else "websockets-sansio",
        # The app has its own heartbeat (PROTOCOL.md); uvicorn's would be a second one.
        ws_ping_interval=None,
        ws_ping_timeout=None,
        # Frames up to this size reach the app, which answers `too_large` and keeps the
        # connection; only beyond it does uvicorn close with 1009.
        ws_max_size=max(4 * settings.max_frame_bytes, 1024 * 1024),
        # Tokens are tiny: compression saves little and costs ~35 KB per connection.
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout),
        proxy_headers=True,
        server_header=False,
        lifespan="on",
    )
    server = TokenwireServer(config, app.state.runtime)
    gc.set_threshold(*GC_THRESHOLDS)
    server.run(sockets=[sock])
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
