"""Log lines that say which request they belong to, as text or as one JSON object per line.

A context variable carries the current request's fields (`request` id, WebSocket `conn`,
hashed `user`, `stream`): the ASGI middlewares here set them for each HTTP request and
WebSocket connection, the transports add the connection and the stream, and tasks started
inside inherit them (asyncio copies the context into each new task), so a generation's
lines carry the request that started it. A filter on the handler stamps each record with
the context when it is emitted; the formatters are pure functions of (record fields,
context).

The user id is never logged as is (logs travel further than the secret, and the id with
the secret is the cookie): lines carry a short hash of it, enough to correlate them.
uvicorn's own loggers (its access log included) propagate to the same handler.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Final, TextIO

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from backend.settings import LOG_FORMATS

REQUEST_ID_HEADER: Final = "x-request-id"
# A caller's request id is kept when it is this plain (so it cannot forge log lines or
# headers), else replaced by one of ours.
_SANE_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_context: ContextVar[Mapping[str, str] | None] = ContextVar("tokenwire_log_context", default=None)


# ---- the context -------------------------------------------------------------------------


def context() -> Mapping[str, str]:
    return _context.get() or {}


def bind(**fields: str | None) -> None:
    """Add fields to the current context (None removes one); code after this in the same
    task, and tasks started after it, log them."""
    merged = {**context(), **fields}
    _context.set({k: v for k, v in merged.items() if v is not None})


def user_tag(user: str) -> str:
    """What logs show of a user id: a short hash (the same user always gets the same one)."""
    return hashlib.sha256(b"tokenwire log\0" + user.encode()).hexdigest()[:12]


def request_id(given: str | None) -> str:
    """The caller's `X-Request-ID` if it is sane, else a new random one."""
    if given is not None and _SANE_REQUEST_ID.fullmatch(given):
        return given
    return secrets.token_hex(8)


# ---- formatting (pure) -------------------------------------------------------------------


def format_json(
    *,
    created: float,
    level: str,
    logger: str,
    message: str,
    context: Mapping[str, str],
    exc: str | None = None,
) -> str:
    """One line of JSON: time (UTC, ISO 8601), level, logger, message, the context fields
    and, for an exception, its traceback as `exc`."""
    line: dict[str, str] = {
        "time": _iso(created),
        "level": level,
        "logger": logger,
        "message": message,
    }
    for key, value in context.items():
        line.setdefault(key, value)  # never let a context field replace the basic four
    if exc:
        line["exc"] = exc
    return json.dumps(line, ensure_ascii=False)


def format_text(line: str, context: Mapping[str, str]) -> str:
    """A text line with the context appended as ` [key=value ...]`."""
    if not context:
        return line
    fields = " ".join(f"{k}={v}" for k, v in context.items())
    return f"{line} [{fields}]"


def _iso(created: float) -> str:
    stamp = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class ContextFilter(logging.Filter):
    """Stamps each record with the context of the code that logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "context"):
            record.context = context()
        return True


class ClientFaultFilter(logging.Filter):
    """Lowers to INFO, without the traceback, what uvicorn logs with `logger.exception` for
    a client's own fault: invalid UTF-8 in a text message, which it answers with close
    1007 as RFC 6455 requires. The server is fine; an operator's ERROR alerts stay quiet."""

    MESSAGES: Final = frozenset({"Invalid UTF-8 sequence received from client."})

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.getMessage() in self.MESSAGES:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
            record.msg, record.args = f"{record.getMessage()} Closed with 1007.", None
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


_CLIENT_FAULTS: Final = ClientFaultFilter()


def _record_context(record: logging.LogRecord) -> Mapping[str, str]:
    found = getattr(record, "context", None)
    return found if isinstance(found, Mapping) else {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        exc = self.formatException(record.exc_info) if record.exc_info else None
        if record.stack_info:
            exc = (exc + "\n" if exc else "") + self.formatStack(record.stack_info)
        return format_json(
            created=record.created,
            level=record.levelname,
            logger=record.name,
            message=record.getMessage(),
            context=_record_context(record),
            exc=exc,
        )


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        first, newline, rest = text.partition("\n")  # the context goes on the message line
        return format_text(first, _record_context(record)) + newline + rest


def setup(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send every log line of the process, uvicorn's included, to `stream` (stderr) in
    `fmt` (`text` or `json`). uvicorn must be run with `log_config=None`, so that its
    loggers keep no handlers of their own and propagate here."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)} (got {fmt!r})")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.setLevel(logging.NOTSET)  # the root's level (uvicorn.Config may set its own)
        logger.propagate = True
    logging.getLogger("uvicorn.error").addFilter(_CLIENT_FAULTS)  # once: the same instance


# ---- ASGI middlewares --------------------------------------------------------------------


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    """Outermost: gives each HTTP request and WebSocket upgrade a request id (the caller's
    `X-Request-ID` when sane), binds it for logging and echoes it in the response's (or the
    WebSocket accept's) `X-Request-ID` header."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await app(scope, receive, send)
            return
        rid = request_id(_header(scope, REQUEST_ID_HEADER.encode()))
        header = (REQUEST_ID_HEADER.encode(), rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message["headers"] = [*(message.get("headers") or []), header]
            await send(message)

        token = _context.set({"request": rid})
        try:
            await app(scope, receive, send_with_id)
        finally:
            _context.reset(token)

    return wrapped


def user_context_middleware(app: ASGIApp) -> ASGIApp:
    """After the identity middleware: binds the caller's hashed user id for logging."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state") if scope["type"] in ("http", "websocket") else None
        user = state.get("user") if isinstance(state, dict) else None
        if isinstance(user, str):
            bind(user=user_tag(user))
        await app(scope, receive, send)

    return wrapped
