"""Structured logs: the pure formatters, and a live server's stderr in JSON with request ids."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from backend.settings import Settings, SettingsError
from backend.web.logs import (
    JsonFormatter,
    TextFormatter,
    bind,
    context,
    format_json,
    format_text,
    request_id,
    setup,
    user_tag,
)
from harness.server import TIMEOUT, Client, Server, new_id, wait_for

# ---- pure pieces ---------------------------------------------------------------------------


def test_format_json_exact() -> None:
    line = format_json(
        created=0.25,
        level="INFO",
        logger="backend.app",
        message='said "hi"\nthen left',
        context={"request": "r1", "stream": "s1"},
    )
    assert line == (
        '{"time": "1970-01-01T00:00:00.250Z", "level": "INFO", "logger": "backend.app", '
        '"message": "said \\"hi\\"\\nthen left", "request": "r1", "stream": "s1"}'
    )


def test_format_json_context_never_replaces_the_basic_fields() -> None:
    line = json.loads(
        format_json(
            created=0,
            level="ERROR",
            logger="x",
            message="m",
            context={"message": "forged", "level": "DEBUG", "user": "u"},
            exc="Traceback ...",
        )
    )
    assert line == {
        "time": "1970-01-01T00:00:00.000Z",
        "level": "ERROR",
        "logger": "x",
        "message": "m",
        "user": "u",
        "exc": "Traceback ...",
    }


@pytest.mark.parametrize(
    ("line", "ctx", "expected"),
    [
        pytest.param("a b", {}, "a b", id="no-context"),
        pytest.param("a", {"request": "r"}, "a [request=r]", id="one"),
        pytest.param(
            "a",
            {"request": "r", "conn": "n/1", "user": "u"},
            "a [request=r conn=n/1 user=u]",
            id="many",
        ),
    ],
)
def test_format_text(line: str, ctx: dict[str, str], expected: str) -> None:
    assert format_text(line, ctx) == expected


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        pytest.param("abc-123", True, id="plain"),
        pytest.param("4bf92f3577b34da6a3ce929d0e0e4736", True, id="trace-id"),
        pytest.param("req:a/b+c=d@e.f_g", True, id="punctuation"),
        pytest.param("x" * 128, True, id="longest"),
        pytest.param("x" * 129, False, id="too-long"),
        pytest.param("", False, id="empty"),
        pytest.param("a b", False, id="space"),
        pytest.param('a"b', False, id="quote"),
        pytest.param("a\nlevel=ERROR", False, id="newline"),
        pytest.param("\u00e9t\u00e9", False, id="non-ascii"),
        pytest.param(None, False, id="absent"),
    ],
)
def test_request_id(given: str | None, kept: bool) -> None:
    rid = request_id(given)
    if kept:
        assert rid == given
    else:
        assert rid != given and len(rid) == 16 and int(rid, 16) >= 0
        assert request_id(given) != rid  # a new one each time


def test_user_tag_is_short_stable_and_not_the_id() -> None:
    assert user_tag("alice") == user_tag("alice")
    assert user_tag("alice") != user_tag("bob")
    assert len(user_tag("alice")) == 12 and "alice" not in user_tag("alice")


def test_bind_adds_removes_and_stays_in_its_context() -> None:
    def inner() -> dict[str, str]:
        bind(request="r", stream="s")
        bind(stream=None, conn="c")
        return dict(context())

    assert contextvars.copy_context().run(inner) == {"request": "r", "conn": "c"}
    assert dict(context()) == {}


async def test_tasks_inherit_the_context() -> None:
    async def outer() -> dict[str, str]:
        bind(conn="n/1")

        async def child() -> dict[str, str]:
            return dict(context())

        return await asyncio.create_task(child())

    assert await asyncio.create_task(outer()) == {"conn": "n/1"}


def _record(ctx: dict[str, str], exc: bool = False) -> logging.LogRecord:
    exc_info: Any = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("backend.x", logging.WARNING, __file__, 1, "n=%d", (3,), exc_info)
    record.context = ctx
    return record


def test_json_formatter_of_a_record() -> None:
    line = json.loads(JsonFormatter().format(_record({"request": "r"}, exc=True)))
    assert line["level"] == "WARNING" and line["logger"] == "backend.x"
    assert line["message"] == "n=3" and line["request"] == "r"
    assert "RuntimeError: boom" in line["exc"]


def test_text_formatter_puts_the_context_on_the_first_line() -> None:
    text = TextFormatter().format(_record({"request": "r"}, exc=True))
    first, *rest = text.split("\n")
    assert first.endswith("WARNING backend.x: n=3 [request=r]")
    assert rest[0].startswith("Traceback") and rest[-1] == "RuntimeError: boom"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_setup_routes_uvicorn_and_the_app_through_one_handler(fmt: str) -> None:
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "uvicorn.access")]
    saved = [(logger, logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    # Another test's uvicorn may have left its own configuration: setup replaces it.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    stream = io.StringIO()
    try:
        setup("info", fmt, stream)

        def log_in_context() -> None:
            bind(request="r9")
            logging.getLogger("uvicorn.access").info("GET / %d", 200)
            logging.getLogger("backend.test").debug("hidden at info")

        contextvars.copy_context().run(log_in_context)
    finally:
        for logger, handlers, level, propagate in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    if fmt == "json":
        assert json.loads(lines[0])["request"] == "r9"
    else:
        assert lines[0].endswith("INFO uvicorn.access: GET / 200 [request=r9]")


@pytest.mark.parametrize(("level", "shown"), [("info", True), ("warning", False)])
def test_uvicorn_invalid_utf8_from_a_client_is_info_without_a_traceback(
    level: str, shown: bool
) -> None:
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "uvicorn.access")]
    saved = [(logger, logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    stream = io.StringIO()
    try:
        setup(level, "text", stream)
        uvicorn_error = logging.getLogger("uvicorn.error")
        try:
            b"\xff".decode()
        except UnicodeDecodeError:  # as uvicorn's websockets-sansio path logs it
            uvicorn_error.exception("Invalid UTF-8 sequence received from client.")
        try:
            raise RuntimeError("a real fault")
        except RuntimeError:
            uvicorn_error.exception("Exception in ASGI application")
    finally:
        for logger, handlers, level_before, propagate in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level_before)
            logger.propagate = propagate
    text = stream.getvalue()
    client_lines = [line for line in text.splitlines() if "Invalid UTF-8" in line]
    assert len(client_lines) == (1 if shown else 0)
    for line in client_lines:
        assert line.endswith(
            " INFO uvicorn.error: Invalid UTF-8 sequence received from client. Closed with 1007."
        )
    assert "UnicodeDecodeError" not in text
    # Any other exception keeps its level and its traceback.
    assert "ERROR uvicorn.error: Exception in ASGI application" in text
    assert text.rstrip().endswith("RuntimeError: a real fault")


def test_log_format_setting() -> None:
    assert Settings.from_env({}).log_format == "text"
    assert Settings.from_env({"TOKENWIRE_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(SettingsError, match="TOKENWIRE_LOG_FORMAT must be one of text, json"):
        Settings.from_env({"TOKENWIRE_LOG_FORMAT": "xml"})


# ---- a live server ---------------------------------------------------------------------------


def _json_lines(server: Server) -> list[dict[str, Any]]:
    """Every line the server wrote, each of which must be one JSON object."""
    lines = []
    for line in server.log().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    return lines


def _has_line(server: Server, match: Callable[[dict[str, Any]], bool]) -> Callable[[], bool]:
    return lambda: any(match(line) for line in _json_lines(server))


async def test_live_json_logs_carry_request_ids(make_server: Callable[..., Server]) -> None:
    server = make_server(log_format="json", log_level="info")
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        given = await http.get("/api/conversations", headers={"X-Request-ID": "req-given-1"})
        assert given.headers["x-request-id"] == "req-given-1"
        made = await http.get("/api/conversations", headers={"X-Request-ID": "not sane!"})
        rid = made.headers["x-request-id"]
        assert rid != "not sane!" and len(rid) == 16
        cookie = http.cookies["tw_id"]  # issued on the first request, sent since
        # An HTTP chat: its line names its request, its stream and its (hashed) user.
        stream = new_id()
        chat = await http.post(
            "/api/chat",
            json={"id": stream, "conversation": new_id(), "text": "hi"},
            headers={"X-Request-ID": "req-chat-1"},
        )
        assert chat.status_code == 202 and chat.headers["x-request-id"] == "req-chat-1"
    for expected in ("req-given-1", rid):
        await wait_for(
            _has_line(
                server,
                lambda line, e=expected: (
                    line.get("request") == e and "GET /api/conversations" in line["message"]
                ),
            )
        )
    user = cookie.split(".")[0]
    await wait_for(
        _has_line(
            server,
            lambda line: (
                line.get("request") == "req-chat-1"
                and line.get("stream") == stream
                and line["message"] == "chat started"
            ),
        )
    )
    lines = _json_lines(server)
    mine = {line["request"] for line in lines if line.get("user") == user_tag(user)}
    assert mine == {"req-given-1", rid, "req-chat-1"}
    assert user not in server.log() and cookie not in server.log()
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys()


async def test_live_websocket_lines_name_the_connection(make_server: Callable[..., Server]) -> None:
    server = make_server(log_format="json", log_level="info")
    client = await Client.connect(server, additional_headers={"X-Request-ID": "ws-req-1"})
    try:
        assert client.ws.response.headers["x-request-id"] == "ws-req-1"
        stream = new_id()
        await client.send(type="chat", id=stream, conversation=new_id(), text="hello")
        await client.until_end(stream)
    finally:
        await client.close()
    await wait_for(
        _has_line(
            server,
            lambda line: (
                line["message"] == "chat started"
                and line.get("request") == "ws-req-1"
                and line.get("conn") == client.hello["session"]
                and line.get("stream") == stream
                and line.get("user") == user_tag(client.cookie.split("=", 1)[1].split(".")[0])
            ),
        )
    )
