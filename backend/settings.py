"""All configuration, read from `TOKENWIRE_*` environment variables and validated at start.

A bad value stops the server with a message that names the variable and the fix, before
anything listens. The README's configuration table lists the same variables: keep them in
step (tests/unit/test_settings.py checks that every variable here is documented there).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, TypeVar

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8000
DEFAULT_DB: Final = "tokenwire.db"
DEFAULT_HEARTBEAT: Final = 30.0
DEFAULT_HEARTBEAT_TIMEOUT: Final = 10.0
DEFAULT_MAX_FRAME_BYTES: Final = 64 * 1024
DEFAULT_MAX_TEXT_CHARS: Final = 32_000
DEFAULT_OUTBOX_BYTES: Final = 1024 * 1024
DEFAULT_SEND_BUFFER_BYTES: Final = 256 * 1024
DEFAULT_STREAM_TTL: Final = 600.0
DEFAULT_STREAM_MAX_TOKENS: Final = 16_384
DEFAULT_SHUTDOWN_TIMEOUT: Final = 10.0
DEFAULT_SSE_KEEPALIVE: Final = 15.0
DEFAULT_LEASE_SECONDS: Final = 10.0
DEFAULT_DEMO_FIRST_TOKEN_DELAY: Final = 0.3
DEFAULT_DEMO_TOKENS_PER_SECOND: Final = 40.0
DEFAULT_DEMO_PARAGRAPHS: Final = 3
DEFAULT_PROVIDER_TIMEOUT: Final = 60.0
DEFAULT_CONTEXT_MESSAGES: Final = 20
DEFAULT_CHAT_RATE: Final = 1.0  # new chats per second per user
DEFAULT_CHAT_BURST: Final = 10.0
DEFAULT_CONNECT_RATE: Final = 20.0  # connection attempts per second per client address
DEFAULT_CONNECT_BURST: Final = 100.0
DEFAULT_MAX_CONNECTIONS: Final = 10_000  # WebSocket connections per process
DEFAULT_MAX_CONNECTIONS_PER_USER: Final = 20
# Tokens generated per user per window (0: no quota): about 800 answers of the demo
# model's length an hour, far above what one person reads, far below a script's flood.
DEFAULT_TOKEN_QUOTA: Final = 200_000
DEFAULT_TOKEN_QUOTA_WINDOW: Final = 3600.0

PROVIDERS: Final = ("demo", "openai", "clock")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")
WEBSOCKET_SERVERS: Final = ("wire", "uvicorn")


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the variable and the fix."""


@dataclass(frozen=True)
class Settings:
    """Each field is read from TOKENWIRE_<FIELD NAME IN UPPER CASE>, except `port` (PORT)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    db: str = DEFAULT_DB
    secret: str | None = None
    node: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    log_level: str = "info"
    log_format: str = "text"
    websocket_server: str = "wire"
    allowed_origins: tuple[str, ...] = ()
    cookie_secure: bool = False
    heartbeat: float = DEFAULT_HEARTBEAT
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    outbox_bytes: int = DEFAULT_OUTBOX_BYTES
    send_buffer_bytes: int = DEFAULT_SEND_BUFFER_BYTES
    stream_ttl: float = DEFAULT_STREAM_TTL
    stream_max_tokens: int = DEFAULT_STREAM_MAX_TOKENS
    context_messages: int = DEFAULT_CONTEXT_MESSAGES
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    sse_keepalive: float = DEFAULT_SSE_KEEPALIVE
    api_tokens: tuple[str, ...] = ()
    redis_url: str | None = None
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    provider: str = "demo"
    demo_first_token_delay: float = DEFAULT_DEMO_FIRST_TOKEN_DELAY
    demo_tokens_per_second: float = DEFAULT_DEMO_TOKENS_PER_SECOND
    demo_paragraphs: int = DEFAULT_DEMO_PARAGRAPHS
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: str | None = None
    openai_model: str = "gpt-4o-mini"
    provider_timeout: float = DEFAULT_PROVIDER_TIMEOUT
    chat_rate: float = DEFAULT_CHAT_RATE
    chat_burst: float = DEFAULT_CHAT_BURST
    connect_rate: float = DEFAULT_CONNECT_RATE
    connect_burst: float = DEFAULT_CONNECT_BURST
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_user: int = DEFAULT_MAX_CONNECTIONS_PER_USER
    token_quota: int = DEFAULT_TOKEN_QUOTA
    token_quota_window: float = DEFAULT_TOKEN_QUOTA_WINDOW

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate; raises `SettingsError` naming the first bad variable."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = env_name(f.name)
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                continue
            parse = _PARSERS.get(f.name, _str)
            values[f.name] = parse(name, raw.strip())
        settings = cls(**values)
        settings._check()
        return settings

    def _check(self) -> None:
        if self.provider == "openai" and not self.openai_base_url.startswith(
            ("http://", "https://")
        ):
            raise SettingsError(
                "TOKENWIRE_OPENAI_BASE_URL must start with http:// or https:// "
                f"(got {self.openai_base_url!r})"
            )
        if self.secret is not None and len(self.secret) < 16:
            raise SettingsError(
                "TOKENWIRE_SECRET must be at least 16 characters; generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )


def env_name(field_name: str) -> str:
    return "PORT" if field_name == "port" else f"TOKENWIRE_{field_name.upper()}"


T = TypeVar("T", int, float)


def _number(kind: type[T], low: T, high: T, hint: str = "") -> Callable[[str, str], T]:
    """A parser for numbers in [low, high]; `hint` (what the value means) ends its errors."""
    suffix = f"; {hint}" if hint else ""

    def parse(name: str, raw: str) -> T:
        try:
            value = kind(raw)
        except ValueError:
            raise SettingsError(
                f"{name} must be {'an integer' if kind is int else 'a number'} "
                f"between {low} and {high} (got {raw!r}){suffix}"
            ) from None
        if not low <= value <= high:
            raise SettingsError(f"{name} must be between {low} and {high} (got {raw!r}){suffix}")
        return value

    return parse


def _choice(options: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.lower()
        if value not in options:
            raise SettingsError(f"{name} must be one of {', '.join(options)} (got {raw!r})")
        return value

    return parse


def _bool(name: str, raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false (got {raw!r})")


def _origins(name: str, raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if not origin.startswith(("http://", "https://")):
            raise SettingsError(
                f"{name} must be a comma-separated list of origins like "
                f"https://chat.example.com (got {origin!r})"
            )
    return origins


def _tokens(name: str, raw: str) -> tuple[str, ...]:
    tokens = tuple(t.strip() for t in raw.split(",") if t.strip())
    for token in tokens:
        if len(token) < 16 or not token.isascii() or any(c.isspace() for c in token):
            raise SettingsError(
                f"{name} must be a comma-separated list of tokens of 16+ printable "
                "characters each; generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
    return tokens


def _redis_url(name: str, raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError(
            f"{name} must start with redis://, rediss:// or unix:// "
            f"(got {raw!r}); for example redis://127.0.0.1:6379/0"
        )
    return raw


def _str(name: str, raw: str) -> str:
    return raw


_DAY = 86_400.0
_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "port": _number(int, 0, 65535),
    "log_level": _choice(LOG_LEVELS),
    "log_format": _choice(LOG_FORMATS),
    "websocket_server": _choice(WEBSOCKET_SERVERS),
    "allowed_origins": _origins,
    "cookie_secure": _bool,
    "heartbeat": _number(float, 0.05, 3600.0),
    "heartbeat_timeout": _number(float, 0.05, 3600.0),
    "max_frame_bytes": _number(int, 1024, 16 * 1024 * 1024),
    "max_text_chars": _number(int, 1, 1_000_000),
    "outbox_bytes": _number(int, 1024, 1024 * 1024 * 1024),
    "send_buffer_bytes": _number(int, 0, 64 * 1024 * 1024),
    "stream_ttl": _number(float, 0.0, 7 * _DAY),
    "stream_max_tokens": _number(int, 1, 10_000_000),
    "context_messages": _number(int, 0, 1000),
    "shutdown_timeout": _number(float, 0.0, 3600.0),
    "sse_keepalive": _number(float, 0.05, 3600.0),
    "api_tokens": _tokens,
    "redis_url": _redis_url,
    "lease_seconds": _number(float, 0.2, 3600.0),
    "provider": _choice(PROVIDERS),
    "demo_first_token_delay": _number(float, 0.0, 60.0),
    "demo_tokens_per_second": _number(float, 0.0, 1_000_000.0),
    "demo_paragraphs": _number(int, 0, 100_000),
    "provider_timeout": _number(float, 0.1, 3600.0),
    # A burst below 1 would refuse everything; a rate of 0 would never refill.
    "chat_rate": _number(float, 0.001, 1_000_000.0),
    "chat_burst": _number(float, 1.0, 1_000_000.0),
    "connect_rate": _number(float, 0.001, 1_000_000.0),
    "connect_burst": _number(float, 1.0, 1_000_000.0),
    "max_connections": _number(int, 1, 10_000_000),
    "max_connections_per_user": _number(int, 1, 1_000_000),
    "token_quota": _number(
        int, 0, 1_000_000_000, "tokens generated per user per window, 0 for no quota"
    ),
    "token_quota_window": _number(
        float, 1.0, 30 * _DAY, "seconds over which TOKENWIRE_TOKEN_QUOTA refills"
    ),
}
