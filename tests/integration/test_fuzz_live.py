"""The live fuzz (`bench/fuzz.py`) at CI scale against a real server, and the bugs fuzzing
found, each pinned by a request that once broke it.

The fuzz sends a few thousand random, malformed and structured frames (nesting, numbers,
escapes, every field of every frame type, the byte limit) on several connections at speed,
over both WebSocket servers (tokenwire's own, "wire", and uvicorn's), and a few hundred
random and structured HTTP requests (`POST /api/chat`, `POST /api/streams/<id>/cancel`),
while two normal clients stream chats; a warm-up, then two rounds. It passes only if every
frame and structured request got exactly its promised answer, every connection stayed
usable, the normal texts were exact, no answer was a 5xx, text that is no UTF-8 closed its
throwaway connection with 1007, no connection or task leaked, RSS grew in the last round
only within its allowance, no failure was contained and the log has no traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from backend.protocol import BAD_FRAME, MAX_NESTING, MAX_SEQ, NOT_FOUND, RETRYABLE, UNAUTHORIZED
from backend.providers import demo_reply
from bench.fuzz import SERVER_SETTINGS, Report, run_live
from harness.server import TIMEOUT, Client, Server, server_factory, start_chat

FRAMES = 3000
WEBSOCKET_SERVERS = ["wire", "uvicorn"]


@pytest.fixture(scope="module")
def fuzz_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Server]]:
    """Servers with the fuzz's settings (small limits, high rate limits), one per WebSocket
    server ("wire" or "uvicorn"), started when first asked for and kept for the module."""
    with server_factory(tmp_path_factory.mktemp("fuzz"), **SERVER_SETTINGS) as make:
        started: dict[str, Server] = {}

        def get(websocket_server: str) -> Server:
            if websocket_server not in started:
                started[websocket_server] = make(websocket_server=websocket_server)
            return started[websocket_server]

        yield get


@pytest.fixture(scope="module")
def fuzz_server(fuzz_servers: Callable[[str], Server]) -> Server:
    return fuzz_servers("wire")


@pytest.mark.parametrize("websocket_server", WEBSOCKET_SERVERS)
async def test_fuzz_ws_and_http_while_normal_clients_stream(
    fuzz_servers: Callable[[str], Server], websocket_server: str
) -> None:
    server = fuzz_servers(websocket_server)
    report = await run_live(
        server, frames=FRAMES, seconds=90, connections=4, http_requests=400, seed=8
    )
    check(report, server, FRAMES)


async def test_fuzz_on_redis(make_server: Callable[..., Server], redis_clean: str) -> None:
    # The same fuzz on the Redis backends (stream log, registry, history, broker), smaller.
    server = make_server(**SERVER_SETTINGS, redis_url=redis_clean)
    report = await run_live(
        server, frames=FRAMES // 2, seconds=90, connections=3, http_requests=200, seed=9
    )
    check(report, server, FRAMES // 2)


def check(report: Report, server: Server, frames: int) -> None:
    print("\n".join(report.lines()))  # shown by pytest on failure: what was tried and found
    assert report.problems == []
    assert sum(report.tried.values()) == frames  # the deadline did not cut the run short
    # Every kind of frame was tried, and answered with the codes PROTOCOL.md names.
    assert set(report.tried) == {
        "binary",
        "junk-text",
        "near-valid",
        "oversized",
        "resume-unknown",
        "cancel-unknown",
        "other-user",
        "chat",
        "resume-own",
        "ping",
        "pong",
        # by structure
        "deep-nesting",
        "numbers",
        "escapes",
        "fields",
        "size-limit",
    }
    assert {
        "post-chat-nesting",
        "post-chat-numbers",
        "post-chat-escapes",
        "post-chat-fields",
        "post-cancel-body",
    } <= set(report.http_tried)
    assert set(report.probes) == {"invalid-utf8", "split-utf8"}
    assert report.stored > 0  # chats with texts of their own were read back
    assert set(report.errors) <= set(RETRYABLE)
    assert {"bad_frame", "too_large", "not_found", "stream_expired"} <= set(report.errors)
    assert all(100 < status < 500 for status in report.http_statuses)
    assert report.connections_dropped == 0
    assert report.normal_streams >= 4 and report.normal_exact == report.normal_streams
    assert server.proc.poll() is None  # the server did not crash
    assert report.connections_leaked == 0
    assert report.tasks_leaked == 0
    assert len(report.rounds) == 3 and report.rss_ok  # warm-up, 2 rounds
    assert report.contained and not any(report.contained.values())
    assert report.tracebacks == 0
    assert report.ok


# ---- regressions: what fuzzing found ---------------------------------------------------------


@pytest.mark.parametrize("websocket_server", WEBSOCKET_SERVERS)
@pytest.mark.parametrize(
    "frame",
    [
        pytest.param("[" * 5000, id="5000-brackets"),
        pytest.param('{"a":' * 1500, id="1500-objects"),
        pytest.param(
            '{"type":"ping","t":1,"x":' + "[" * 4000 + "]" * 4000 + "}", id="in-a-valid-ping"
        ),
    ],
)
async def test_thousands_of_nested_brackets_are_one_bad_frame_and_the_connection_carries_on(
    fuzz_servers: Callable[[str], Server], websocket_server: str, frame: str
) -> None:
    # Killed the connection: msgspec recursed once per level and raised RecursionError.
    # Nesting beyond MAX_NESTING is refused before any decoder runs.
    server = fuzz_servers(websocket_server)
    assert len(frame.encode()) <= SERVER_SETTINGS["max_frame_bytes"]
    assert frame.count("[") + frame.count("{") > MAX_NESTING
    client = await Client.connect(server)
    try:
        await client.ws.send(frame)
        await client.send(type="ping", t=12345)
        answers = []
        while (answer := await client.recv())["type"] != "pong":
            if answer["type"] != "ping":  # the heartbeat
                answers.append(answer)
        assert answer == {"type": "pong", "t": 12345}
        assert [(a["type"], a["code"], a["id"]) for a in answers] == [("error", BAD_FRAME, None)]
        # The same connection streams a chat to its exact end.
        prompt = "after the brackets"
        stream, _ = await start_chat(client, prompt)
        view = await client.until_end(stream)
        assert view.end is not None and view.end["type"] == "done"
        assert view.end["reason"] == "stop"
        assert view.text == demo_reply(prompt, int(SERVER_SETTINGS["demo_paragraphs"]))
        assert view.duplicates == 0 and view.gaps == 0
    finally:
        await client.close()


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == code and body["retryable"] is RETRYABLE[code] and body["message"]
    return body


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"id":"a","conversation":"b","text":"\xff"}', id="text-not-utf8"),
        pytest.param(b'{"id":"a","conversation":"b","text":"\xed\xa0\x80"}', id="surrogate"),
        pytest.param(b'{"id":5,"conversation":"b","text":"\xc3"}', id="bad-id-and-not-utf8"),
    ],
)
def test_chat_body_that_is_not_utf8_is_bad_frame_not_500(fuzz_server: Server, body: bytes) -> None:
    # Was a 500: msgspec raises UnicodeDecodeError, not DecodeError, for such strings.
    response = httpx.post(
        f"{fuzz_server.url}/api/chat",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    error_of(response, 400, BAD_FRAME)
    assert fuzz_server.proc.poll() is None


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        pytest.param({"Last-Event-ID": b"\xb2"}, {}, id="last-event-id-superscript-two"),
        pytest.param({}, {"after": "\u00b9\u00b2"}, id="after-superscript-digits"),
        pytest.param({}, {"after": "\u0661\u0662"}, id="after-arabic-indic-digits"),
        pytest.param({}, {"after": str(MAX_SEQ + 1)}, id="after-beyond-max-seq"),
        pytest.param({"Last-Event-ID": b"99999999999999999"}, {}, id="last-event-id-17-digits"),
    ],
)
def test_stream_position_that_is_no_seq_is_bad_frame_not_500(
    fuzz_server: Server, headers: dict[str, bytes], params: dict[str, str]
) -> None:
    # Was a 500: str.isdigit() admits "²", which int() refuses.
    with httpx.Client(base_url=fuzz_server.url, timeout=TIMEOUT) as http:
        response = http.get("/api/streams/abc", headers=headers, params=params)
    body = error_of(response, 400, BAD_FRAME)
    assert "must be a seq" in body["message"]


@pytest.mark.parametrize("origin", ["http://[::1", "http://[zz]", "http://a]b"])
async def test_malformed_origin_is_refused_not_a_500(fuzz_server: Server, origin: str) -> None:
    # Was a 500 and a traceback: urlsplit raises ValueError on a bracketed host that is no
    # IP address, in the origin check of every state-changing request and upgrade.
    log_start = len(fuzz_server.log())
    async with httpx.AsyncClient(base_url=fuzz_server.url, timeout=TIMEOUT) as http:
        response = await http.post("/api/chat", headers={"Origin": origin}, content=b"{}")
    error_of(response, 403, UNAUTHORIZED)
    with pytest.raises(InvalidStatus) as refused:
        await Client.connect(fuzz_server, additional_headers={"Origin": origin})
    assert refused.value.response.status_code == 403
    assert "Traceback" not in fuzz_server.log()[log_start:]


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
@pytest.mark.parametrize("path", ["/%00", "/a%00b.html", "/vendor/x/%00", "/api/chat%00"])
async def test_path_with_a_nul_byte_is_not_found_not_a_500(
    fuzz_server: Server, method: str, path: str
) -> None:
    # Was a 500 and a traceback: the static files' stat() raises ValueError on a NUL.
    # (A method the matched route lacks is refused by the router first: 405.)
    log_start = len(fuzz_server.log())
    async with httpx.AsyncClient(base_url=fuzz_server.url, timeout=TIMEOUT) as http:
        response = await http.request(method, path)
    assert response.status_code in (404, 405)
    if method != "HEAD":
        code = NOT_FOUND if response.status_code == 404 else BAD_FRAME
        error_of(response, response.status_code, code)
    assert "Traceback" not in fuzz_server.log()[log_start:]


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_resume_after_the_largest_seq_is_answered(
    make_server: Callable[..., Server], request: pytest.FixtureRequest, backend: str
) -> None:
    # Was silence on Redis: `after` had no bound, XRANGE refused an id beyond 64 bits, and
    # the error was taken for a storage outage, retried by the watch forever. Now `after`
    # is at most MAX_SEQ: beyond it the frame is refused, at it the finished stream ends.
    settings = {"redis_url": request.getfixturevalue("redis_clean")} if backend == "redis" else {}
    server = make_server(**settings)
    client = await Client.connect(server)
    try:
        stream, _ = await start_chat(client, "to the end")
        done = await client.until_end(stream)
        assert done.end is not None and done.end["type"] == "done"
        await client.send(type="resume", id=stream, after=MAX_SEQ + 1)
        refused = await client.until(lambda f: f["type"] == "error")
        assert (refused["code"], refused["id"]) == (BAD_FRAME, stream)
        await client.send(type="resume", id=stream, after=MAX_SEQ)
        answer = await client.until(lambda f: f.get("id") == stream, timeout=10)
        assert answer["type"] == "done" and answer["reason"] == "stop"
        # And the connection carries on.
        await client.send(type="cancel", id="no-such-stream")
        missing = await client.until(lambda f: f["type"] == "error")
        assert (missing["code"], missing["id"]) == (NOT_FOUND, "no-such-stream")
    finally:
        await client.close()


async def test_resumes_of_unknown_ids_are_not_found_while_the_watch_runs(
    make_server: Callable[..., Server],
) -> None:
    # Was `stream_expired` now and then: the delivery's watch, timing every open stream,
    # marked a stream whose first log read was still running as one this client had been
    # shown, and the `not_found` of that read became `stream_expired`. A short lease makes
    # the watch tick every 0.1 s, so many resumes meet it.
    server = make_server(lease_seconds=0.2)
    client = await Client.connect(server)
    ids = [f"unknown-{i}" for i in range(1500)]
    try:
        for stream in ids:
            await client.send(type="resume", id=stream, after=0)
        answers: dict[str, str] = {}
        async with asyncio.timeout(TIMEOUT):
            while len(answers) < len(ids):
                frame = await client.until(lambda f: f["type"] == "error")
                answers[frame["id"]] = frame["code"]
        assert {code for code in answers.values()} == {NOT_FOUND}
    finally:
        await client.close()
