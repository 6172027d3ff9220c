"""The HTTP API: start and cancel chats, read history, health. Routes only.

Errors leave as JSON with the body of an `error` frame and the status of its code
(`protocol.HTTP_STATUS`), from our own `ProtocolError` and from Litestar's exceptions alike, so
a script handles one shape. Exception text never reaches a client.
"""

from __future__ import annotations

import logging
import math
import re
from typing import TYPE_CHECKING, Any

from litestar import MediaType, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException

from backend.chat.service import STORAGE_ERRORS
from backend.delivery.hub import Hub
from backend.protocol import (
    BAD_FRAME,
    HTTP_STATUS,
    ID_PATTERN,
    INTERNAL,
    NOT_FOUND,
    RATE_LIMITED,
    TOO_LARGE,
    UNAUTHORIZED,
    ErrorFrame,
    ProtocolError,
    decode_chat_request,
    encode,
    error_frame,
)
from backend.runtime import Runtime
from backend.storage.ratelimit import retry_after_rounded
from backend.web.logs import bind

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Receive, Scope, Send


log = logging.getLogger(__name__)

_ID_RE = re.compile(ID_PATTERN)


def error_response(frame: ErrorFrame, headers: dict[str, str] | None = None) -> Response[bytes]:
    if frame.retry_after is not None:
        # HTTP's Retry-After is whole seconds: round up, so retrying then passes.
        headers = {**(headers or {}), "Retry-After": str(max(1, math.ceil(frame.retry_after)))}
    return Response(
        encode(frame),
        status_code=HTTP_STATUS.get(frame.code, 500),
        media_type=MediaType.JSON,
        headers=headers,
    )


def handle_api_error(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    frame = exc.frame if isinstance(exc, ProtocolError) else None
    assert frame is not None  # registered only for ProtocolError
    return error_response(frame)


_STATUS_CODES = {404: NOT_FOUND, 405: BAD_FRAME, 413: TOO_LARGE, 401: UNAUTHORIZED}


def handle_http_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Litestar's own errors (unknown route, wrong method, ...) in our shape, and any other
    exception as a 500 `internal`: logged once and counted, its text never sent."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status >= 500:
        runtime: Runtime | None = getattr(request.app.state, "runtime", None)
        if runtime is not None:
            runtime.metrics.contained_failures.add("http")
        log.error("%s %s failed; answered 500", request.method, request.url.path, exc_info=exc)
        frame = error_frame(INTERNAL, "internal server error")
        return Response(encode(frame), status_code=500, media_type=MediaType.JSON)
    code = _STATUS_CODES.get(status, BAD_FRAME)
    message = "no such route" if status == 404 else str(exc.detail)  # type: ignore[attr-defined]
    frame = error_frame(code, message)
    return Response(encode(frame), status_code=status, media_type=MediaType.JSON)


def path_guard_middleware(app: ASGIApp) -> ASGIApp:
    """Answer `not_found` to a path holding a NUL byte before its handler runs: no route
    has one, and the static files' stat() raises ValueError on it (a 500). Litestar has
    matched a route by then, so a method that route lacks was already refused (405)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if str(scope["type"]) == "http" and "\x00" in scope["path"]:
            body = encode(error_frame(NOT_FOUND, "no such route"))
            await send(
                {
                    "type": "http.response.start",
                    "status": HTTP_STATUS[NOT_FOUND],
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        await app(scope, receive, send)

    return wrapped


def client_address(scope: Scope) -> str:
    """The caller's IP address (uvicorn has applied a trusted proxy's X-Forwarded-For)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


async def connect_refusal(runtime: Runtime, scope: Scope) -> ErrorFrame | None:
    """`rate_limited` if the caller's address has used up its connection attempts (this
    attempt counts), else None. For WebSocket upgrades and SSE responses alike."""
    s = runtime.settings
    try:
        wait = await runtime.limiter.take(
            f"connect:{client_address(scope)}", s.connect_rate, s.connect_burst
        )
    except STORAGE_ERRORS:
        # Fail open: while Redis is away, an outage of the limiter must not also refuse
        # every reconnecting client (the per-process caps still apply).
        log.warning("rate limiter unavailable; admitting the connection", exc_info=True)
        return None
    if wait <= 0:
        return None
    return error_frame(
        RATE_LIMITED,
        "too many connection attempts; retry after `retry_after` seconds",
        retry_after=retry_after_rounded(wait),
    )


def checked_id(value: str, field: str = "id") -> str:
    if not _ID_RE.fullmatch(value):
        raise ProtocolError(
            error_frame(BAD_FRAME, f"`{field}` must be 1 to 64 characters of [A-Za-z0-9_-]")
        )
    return value


def user_of(request: Request[Any, Any, Any]) -> str:
    user: str = request.scope["state"]["user"]
    return user


async def read_body(request: Request[Any, Any, Any], limit: int) -> bytes:
    """The request body, refused with `too_large` as soon as it exceeds `limit`: from its
    Content-Length before reading anything, or while reading a chunked one."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(_too_large(limit))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ProtocolError(_too_large(limit))
    return bytes(body)


def _too_large(limit: int) -> ErrorFrame:
    return error_frame(TOO_LARGE, f"request body is larger than the limit of {limit} bytes")


# ---- routes ------------------------------------------------------------------------------


@post("/api/chat", status_code=202)
async def post_chat(request: Request[Any, Any, Any], state: State) -> Response[dict[str, str]]:
    runtime = state.runtime
    s = runtime.settings
    body = await read_body(request, s.max_frame_bytes)
    chat = decode_chat_request(body, max_bytes=s.max_frame_bytes, max_text=s.max_text_chars)
    bind(stream=chat.id)  # log lines (and the generation's) name it
    accepted = await runtime.chat.start(
        user_of(request), chat.id, chat.conversation, chat.text, origin="http"
    )
    if not accepted.new:
        runtime.metrics.replays += 1
    log.info("chat %s", "started" if accepted.new else "replayed")
    return Response(
        {
            "id": chat.id,
            "conversation": accepted.conversation,
            "stream": f"/api/streams/{chat.id}",
        },
        status_code=202 if accepted.new else 200,
    )


@post("/api/streams/{stream_id:str}/cancel", status_code=202)
async def cancel_stream(
    request: Request[Any, Any, Any], state: State, stream_id: str
) -> dict[str, str]:
    await state.runtime.chat.cancel(user_of(request), checked_id(stream_id))
    return {"id": stream_id}


@get("/api/conversations")
async def list_conversations(request: Request[Any, Any, Any], state: State) -> dict[str, Any]:
    found = await state.runtime.history.list_conversations(user_of(request))
    return {"conversations": found}


@get("/api/conversations/{conversation:str}")
async def get_conversation(
    request: Request[Any, Any, Any], state: State, conversation: str
) -> dict[str, Any]:
    user = user_of(request)
    history = state.runtime.history
    summary = await history.conversation(user, checked_id(conversation, "conversation"))
    messages = await history.messages(user, conversation)
    if summary is None or messages is None:
        raise ProtocolError(error_frame(NOT_FOUND, "no such conversation"))
    return {"conversation": conversation, "title": summary.title, "messages": messages}


@get("/healthz", media_type=MediaType.JSON, sync_to_thread=False)
def healthz(state: State) -> dict[str, Any]:
    return {"status": "ok", "node": state.runtime.settings.node}


@get("/readyz", media_type=MediaType.JSON, sync_to_thread=False)
def readyz(state: State) -> Response[dict[str, Any]]:
    hub: Hub = state.runtime.hub
    node = state.runtime.settings.node
    if hub.draining:
        return Response({"status": "draining", "node": node}, status_code=503)
    if not state.runtime.broker.healthy:
        return Response({"status": "broker unreachable", "node": node}, status_code=503)
    return Response({"status": "ready", "node": node})
