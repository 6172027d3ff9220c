"""`python -m backend`: serve tokenwire with uvicorn, configured from the environment.

Used by `make run` and the Procfile. It runs uvicorn programmatically for one reason:
on SIGTERM, uvicorn closes open WebSockets with 1012 before the app hears of it, but
PROTOCOL.md promises 1001 ("reconnect at once"), so the server first lets the app close
them itself, then shuts down as usual within TOKENWIRE_SHUTDOWN_TIMEOUT.
"""

from __future__ import annotations

import math
import socket
import sys

import uvicorn

from backend.app import Runtime, create_app
from backend.logs import setup as setup_logging
from backend.settings import Settings, SettingsError


class TokenwireServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.runtime.drain()
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
        # uvicorn's loggers (its access log too) go through `backend.logs`' handler.
        log_config=None,
        ws="websockets-sansio",
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
    server.run(sockets=[sock])
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
