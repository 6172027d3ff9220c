"""The HTTP API and the SSE fallback end to end: a real server process, httpx, and an SSE
parser that reads the bytes as a browser would.

Every streaming test checks what a user would finally see: the demo model's text for the
prompt, exactly once, in order, whichever transport started the stream and whichever
resumed it.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from backend.providers import demo_reply, demo_tokens
from harness.server import TIMEOUT, Client, Server, StreamView, new_id, start_chat, wait_for
from tests.support.sse_client import (
    Event,
    SseResponse,
    fold,
    parse_events,
    parse_response,
    raw_request,
    read_until_eof,
    sse_stream,
)

# Tokens must be 16+ printable characters (settings refuse shorter ones).
TOKEN_A = "tokA-0123456789abcdef"
TOKEN_B = "tokB-0123456789abcdef"
ERROR_KEYS = {"type", "id", "code", "message", "retryable"}


@dataclass
class User:
    """One identity talking to the API: a cookie or a bearer token, sent on every request.
    Each request uses a client of its own, so no cookie jar adds or mixes identities."""

    server: Server
    headers: dict[str, str]

    @property
    def cookie(self) -> str:
        return self.headers["Cookie"]

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        async with httpx.AsyncClient(base_url=self.server.url, timeout=TIMEOUT) as http:
            return await asyncio.wait_for(
                http.request(method, path, headers=headers, **kwargs), TIMEOUT
            )

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", path, **kwargs)

    def get_now(self, path: str) -> httpx.Response:
        """A blocking GET, for `wait_for` conditions."""
        return httpx.get(f"{self.server.url}{path}", headers=self.headers, timeout=TIMEOUT)

    async def chat(self, text: str, conversation: str | None = None) -> tuple[str, str]:
        """POST a new chat; returns (stream id, conversation)."""
        body = chat_body(text, conversation)
        response = await self.post("/api/chat", json=body)
        assert response.status_code == 202, response.text
        assert response.json() == {
            "id": body["id"],
            "conversation": body["conversation"],
            "stream": f"/api/streams/{body['id']}",
        }
        return body["id"], body["conversation"]

    def sse(self, stream: str, **kwargs: Any) -> AbstractAsyncContextManager[SseResponse]:
        return sse_stream(self.server, stream, headers=self.headers, **kwargs)

    def answer_saved(self, conversation: str, stream: str) -> bool:
        response = self.get_now(f"/api/conversations/{conversation}")
        return response.status_code == 200 and any(
            m["id"] == stream and m["role"] == "assistant" for m in response.json()["messages"]
        )


def chat_body(text: str, conversation: str | None = None) -> dict[str, str]:
    return {"id": new_id(), "conversation": conversation or new_id(), "text": text}


async def new_user(server: Server) -> User:
    """A new anonymous identity, from the cookie the first /api call gets."""
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        response = await asyncio.wait_for(http.get("/api/conversations"), TIMEOUT)
    assert response.status_code == 200
    assert response.json() == {"conversations": []}
    cookie = response.headers["set-cookie"].split(";", 1)[0]
    assert cookie.startswith("tw_id=")
    return User(server, {"Cookie": cookie})


def bearer(server: Server, token: str) -> User:
    return User(server, {"Authorization": f"Bearer {token}"})


def assert_error(
    response: httpx.Response,
    status: int,
    code: str,
    *,
    id: Any = ...,
    names: str | None = None,
) -> dict[str, Any]:
    """`response` is the JSON error of PROTOCOL.md with this status and code; `names` is a
    field its message must name."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == ERROR_KEYS, body
    assert (body["type"], body["code"]) == ("error", code), body
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["retryable"], bool)
    if id is not ...:
        assert body["id"] == id
    if names is not None:
        assert re.search(rf"\b{names}\b", body["message"]), body["message"]
    return body


def assert_whole_answer(view: StreamView, prompt: str, paragraphs: int | None = None) -> None:
    expected = demo_reply(prompt) if paragraphs is None else demo_reply(prompt, paragraphs)
    assert view.text == expected
    assert (view.duplicates, view.gaps) == (0, 0)
    assert view.end is not None
    assert (view.end["type"], view.end.get("reason")) == ("done", "stop")
    assert view.end["seq"] == view.last


def is_token_from(seq: int) -> Callable[[Event], bool]:
    return lambda e: e.event == "token" and e.data["seq"] >= seq


# ---- identity and health ------------------------------------------------------------------


async def test_first_api_call_issues_the_identity_cookie(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        first = await asyncio.wait_for(http.get("/api/conversations"), TIMEOUT)
    set_cookie = first.headers["set-cookie"]
    assert set_cookie.startswith("tw_id=")
    attributes = {a.strip().split("=")[0].lower() for a in set_cookie.split(";")[1:]}
    assert {"httponly", "samesite", "path"} <= attributes
    assert "samesite=lax" in set_cookie.lower()
    user = User(server, {"Cookie": set_cookie.split(";", 1)[0]})
    again = await user.get("/api/conversations")
    assert again.status_code == 200
    assert "set-cookie" not in again.headers  # a known identity keeps its cookie


async def test_health_and_readiness(server: Server) -> None:
    user = await new_user(server)
    health = await user.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    ready = await user.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


# ---- streaming over SSE ---------------------------------------------------------------------


async def test_post_then_sse_streams_the_answer(server: Server) -> None:
    prompt = "Tell me about server-sent events"
    user = await new_user(server)
    stream, _ = await user.chat(prompt)
    async with user.sse(stream) as sse:
        assert sse.status == 200
        assert sse.headers["content-type"].startswith("text/event-stream")
        events = await sse.read_to_end()
    assert sse.ended  # the server ended the response after `done`
    assert all(e.event == e.data["type"] and e.data["id"] == stream for e in events)
    *tokens, done = events
    assert tokens and {e.event for e in tokens} == {"token"}
    seqs = [e.data["seq"] for e in tokens]
    assert [e.id for e in tokens] == [str(seq) for seq in seqs]
    assert seqs == sorted(set(seqs))
    assert all(e.data.get("n", 2) > 1 for e in tokens)  # `n` is omitted when 1
    assert done.data == {
        "type": "done",
        "id": stream,
        "seq": len(demo_tokens(prompt)),
        "reason": "stop",
    }
    assert done.id == str(done.data["seq"])
    assert_whole_answer(fold(events), prompt)


@pytest.mark.parametrize("resume_with", ["last-event-id", "after"])
async def test_cut_mid_stream_and_resume_exactly_once(server: Server, resume_with: str) -> None:
    prompt = f"cut me off, resume with {resume_with}"
    user = await new_user(server)
    stream, _ = await user.chat(prompt)
    async with user.sse(stream) as sse:
        await sse.until(is_token_from(20))
        seen = fold(sse.events)  # every event received before the network drops
        last_event_id = sse.parser.last_event_id
    assert seen.end is None  # the cut was mid-stream
    assert last_event_id == str(seen.last)
    # The server notices the cut and frees the response.
    await wait_for(lambda: server.metrics()["tokenwire_sse_responses"] == 0)

    if resume_with == "last-event-id":
        resume: dict[str, Any] = {"last_event_id": last_event_id}
    else:
        resume = {"after": seen.last}
    async with user.sse(stream, **resume) as sse:
        events = await sse.read_to_end()
    first = events[0].data
    assert first["seq"] - first.get("n", 1) + 1 == seen.last + 1
    assert_whole_answer(fold(events, seen), prompt)


async def test_last_event_id_wins_over_after(server: Server) -> None:
    # A browser's EventSource reconnects to the original URL (here ?after=0) and adds the
    # Last-Event-ID header: the header is where it really is.
    prompt = "header over query"
    tokens = demo_tokens(prompt)
    user = await new_user(server)
    stream, _ = await user.chat(prompt)
    async with user.sse(stream, after=0, last_event_id=5) as sse:
        events = await sse.read_to_end()
    first = events[0].data
    assert first["seq"] - first.get("n", 1) + 1 == 6
    assert first["data"] == "".join(tokens[5 : first["seq"]])
    assert_whole_answer(fold(events, StreamView(text="".join(tokens[:5]), last=5)), prompt)


@pytest.mark.parametrize("after", ["-1", "three", "1.5"], ids=["negative", "not-int", "fraction"])
async def test_bad_after_is_refused(server: Server, after: str) -> None:
    user = await new_user(server)
    stream, _ = await user.chat("bad after")
    async with user.sse(stream, after=after) as sse:
        await sse.error_body()
    assert_error(sse.response, 400, "bad_frame", names="after")


async def test_provider_failure_ends_the_response_with_an_error_event(server: Server) -> None:
    user = await new_user(server)
    stream, _ = await user.chat("/fail over sse")
    async with user.sse(stream) as sse:
        events = await sse.read_to_end()
    assert sse.ended
    error = events[-1]
    assert error.event == "error"
    assert error.id is None  # only token and done events carry an id
    assert (error.data["id"], error.data["code"], error.data["retryable"]) == (
        stream,
        "provider_error",
        True,
    )
    view = fold(events)
    assert view.text and demo_reply("/fail over sse").startswith(view.text)


# ---- one stream, two transports -------------------------------------------------------------


async def test_websocket_stream_resumed_over_sse(server: Server) -> None:
    prompt = "from websocket to sse"
    client = await Client.connect(server)
    stream, _ = await start_chat(client, prompt)
    await client.until(lambda f: f["type"] == "token" and f["seq"] >= 10)
    seen = client.view(stream)
    await client.close()
    assert seen.end is None  # the cut was mid-stream
    async with sse_stream(server, stream, cookie=client.cookie, last_event_id=seen.last) as sse:
        events = await sse.read_to_end()
    assert_whole_answer(fold(events, seen), prompt)


async def test_http_stream_resumed_over_websocket(server: Server) -> None:
    prompt = "from sse to websocket"
    user = await new_user(server)
    stream, _ = await user.chat(prompt)
    async with user.sse(stream) as sse:
        await sse.until(is_token_from(10))
        seen = fold(sse.events)
    assert seen.end is None
    client = await Client.connect(server, cookie=user.cookie)
    await client.resume(stream, seen)
    assert_whole_answer(await client.until_end(stream), prompt)
    await client.close()


async def test_posted_chat_reaches_the_users_websocket(server: Server) -> None:
    prompt = "posted, seen in the open tab"
    tab = await Client.connect(server)
    user = User(server, {"Cookie": tab.cookie})
    stream, conversation = await user.chat(prompt)
    message = await tab.until(lambda f: f["type"] == "message")
    assert message == {
        "type": "message",
        "id": stream,
        "conversation": conversation,
        "text": prompt,
    }
    assert_whole_answer(await tab.until_end(stream), prompt)
    await tab.close()


# ---- idempotency, conflict, cancel, expiry, ownership --------------------------------------


async def test_repeated_post_is_idempotent_and_other_content_conflicts(server: Server) -> None:
    prompt = "only once over http"
    user = await new_user(server)
    before = server.metrics()["tokenwire_generations_total"]
    body = chat_body(prompt)
    first = await user.post("/api/chat", json=body)
    assert first.status_code == 202
    again = await user.post("/api/chat", json=body)  # a retry while it streams
    assert again.status_code == 200
    assert again.json() == first.json()
    for other in ({**body, "text": "different"}, {**body, "conversation": new_id()}):
        assert_error(await user.post("/api/chat", json=other), 409, "conflict", id=body["id"])

    async with user.sse(body["id"]) as sse:
        view = fold(await sse.read_to_end())
    assert_whole_answer(view, prompt)
    late = await user.post("/api/chat", json=body)  # a retry after the answer ended
    assert (late.status_code, late.json()) == (200, first.json())
    assert server.metrics()["tokenwire_generations_total"] == before + 1


async def test_cancel_over_http(server: Server) -> None:
    prompt = "stop me over http"
    user = await new_user(server)
    tab = await Client.connect(server, cookie=user.cookie)
    stream, conversation = await user.chat(prompt)
    async with user.sse(stream) as sse:
        await sse.until(is_token_from(5))
        response = await user.post(f"/api/streams/{stream}/cancel")
        assert (response.status_code, response.json()) == (202, {"id": stream})
        events = await sse.read_to_end()
    view = fold(events)
    assert view.end == {"type": "done", "id": stream, "seq": view.last, "reason": "cancelled"}
    assert events[-1].id == str(view.last)
    full = demo_reply(prompt)
    assert full.startswith(view.text) and len(view.text) < len(full)
    assert (view.duplicates, view.gaps) == (0, 0)

    tab_view = await tab.until_end(stream)  # the open tab sees the same end
    assert (tab_view.text, tab_view.end) == (view.text, view.end)
    await tab.close()

    await wait_for(lambda: user.answer_saved(conversation, stream))
    detail = (await user.get(f"/api/conversations/{conversation}")).json()
    assert [(m["role"], m["text"], m["complete"]) for m in detail["messages"]] == [
        ("user", prompt, True),
        ("assistant", view.text, False),
    ]


async def test_expired_stream_is_gone(make_server: Any) -> None:
    server = make_server(stream_ttl=0.5)
    prompt = "short lived"
    user = await new_user(server)
    stream, _ = await user.chat(prompt)
    async with user.sse(stream) as sse:
        assert_whole_answer(fold(await sse.read_to_end()), prompt)
    await wait_for(lambda: user.get_now(f"/api/streams/{stream}").status_code == 410)
    for resume in ({}, {"after": 3}, {"last_event_id": 3}):
        async with user.sse(stream, **resume) as sse:
            await sse.error_body()
        assert_error(sse.response, 410, "stream_expired", id=stream)


async def test_another_users_stream_and_conversation_are_not_found(server: Server) -> None:
    prompt = "mine over http"
    owner, stranger = await new_user(server), await new_user(server)
    assert owner.cookie != stranger.cookie
    stream, conversation = await owner.chat(prompt)
    never = new_id()
    for method, theirs_path, unknown_path in [
        ("GET", f"/api/streams/{stream}", f"/api/streams/{never}"),
        ("POST", f"/api/streams/{stream}/cancel", f"/api/streams/{never}/cancel"),
        ("GET", f"/api/conversations/{conversation}", f"/api/conversations/{never}"),
    ]:
        theirs = assert_error(await stranger.request(method, theirs_path), 404, "not_found")
        unknown = assert_error(await stranger.request(method, unknown_path), 404, "not_found")
        # Existence is never leaked: another user's id answers like an unknown one.
        assert {**theirs, "id": None} == {**unknown, "id": None}
        assert_error(await owner.request(method, unknown_path), 404, "not_found")
    async with sse_stream(server, stream, cookie=stranger.cookie) as sse:
        await sse.error_body()
    assert_error(sse.response, 404, "not_found")
    assert (await stranger.get("/api/conversations")).json() == {"conversations": []}

    async with owner.sse(stream) as sse:  # the stranger's cancel did nothing
        assert_whole_answer(fold(await sse.read_to_end()), prompt)


# ---- bad requests ---------------------------------------------------------------------------

MALFORMED: list[tuple[str, Any, str | None]] = [
    ("not-json", b"hello", None),
    ("array", b"[1, 2]", None),
    ("missing-text", {"id": "m1", "conversation": "c"}, "text"),
    ("text-number", {"id": "m2", "conversation": "c", "text": 5}, "text"),
    ("bad-id", {"id": "a b", "conversation": "c", "text": "x"}, "id"),
    ("id-too-long", {"id": "x" * 65, "conversation": "c", "text": "x"}, "id"),
    ("bad-conversation", {"id": "m3", "conversation": "../c", "text": "x"}, "conversation"),
    ("empty-body", b"", None),
]


@pytest.mark.parametrize(
    ("body", "field"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
async def test_malformed_chat_is_bad_frame(server: Server, body: Any, field: str | None) -> None:
    user = await new_user(server)
    before = server.metrics()["tokenwire_generations_total"]
    sent = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = await user.post("/api/chat", headers={"Content-Type": "application/json"}, **sent)
    error = assert_error(response, 400, "bad_frame", names=field)
    assert error["retryable"] is False
    assert server.metrics()["tokenwire_generations_total"] == before


LIMIT = 64 * 1024  # the default TOKENWIRE_MAX_FRAME_BYTES of the module's server
PREFIX = b'{"id":"big","conversation":"c","text":"'


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_oversized_body_is_refused_before_it_is_read(server: Server, framing: str) -> None:
    # The client sends the head and a first part of a big body, then waits: an answer at
    # all shows the server refused it without reading the rest, from the Content-Length,
    # or, for a chunked body, as soon as what it read passed the limit. (1 MiB, not 10 MB:
    # Litestar refuses 10 MB by itself, and this is about our limit.)
    user = await new_user(server)
    if framing == "content-length":
        framing_header = f"Content-Length: {16 * LIMIT}"
        body = PREFIX + b"y" * 1024
    else:
        framing_header = "Transfer-Encoding: chunked"
        body = chunk(PREFIX) + chunk(b"y" * LIMIT)  # and no last chunk
    head = "\r\n".join(
        [
            "POST /api/chat HTTP/1.1",
            f"Host: 127.0.0.1:{server.port}",
            f"Cookie: {user.cookie}",
            "Content-Type: application/json",
            framing_header,
            "Connection: close",
        ]
    )
    sock = await raw_request(server, head, body=body)
    raw = parse_response(await read_until_eof(sock))
    response = httpx.Response(raw.status, headers=raw.headers, content=raw.body)
    assert_error(response, 413, "too_large")


async def test_huge_body_from_an_ordinary_client_gets_413(server: Server) -> None:
    # A client library that sends the whole 10 MB before reading still gets a clean answer.
    user = await new_user(server)
    size = 160 * LIMIT

    async def huge_body() -> Any:
        yield PREFIX
        for _ in range(160):
            yield b"y" * LIMIT

    response = await user.post(
        "/api/chat",
        headers={"Content-Type": "application/json", "Content-Length": str(len(PREFIX) + size)},
        content=huge_body(),
    )
    assert_error(response, 413, "too_large")


async def test_text_over_the_limit_is_too_large(server: Server) -> None:
    user = await new_user(server)
    body = chat_body("y" * 32_001)  # the default limit is 32,000 characters
    response = await user.post("/api/chat", json=body)
    assert_error(response, 413, "too_large", id=body["id"], names="text")
    at_limit = await user.post("/api/chat", json=chat_body("y" * 32_000))
    assert at_limit.status_code == 202


# ---- keep-alive, bearer tokens, history -----------------------------------------------------


async def test_keepalive_comments_on_a_quiet_stream(make_server: Any) -> None:
    server = make_server(sse_keepalive=0.2, demo_first_token_delay=0.7, demo_tokens_per_second=4)
    user = await new_user(server)
    stream, _ = await user.chat("quiet please")
    async with user.sse(stream) as sse:
        await sse.until(is_token_from(3))
        comments = list(sse.comments)
    assert comments
    assert comments[0].events_before == 0  # one came while waiting for the first token
    assert sum(c.events_before in (1, 2) for c in comments) >= 1  # and between tokens


async def test_bearer_tokens_are_users(make_server: Any) -> None:
    server = make_server(api_tokens=f"{TOKEN_A},{TOKEN_B}")
    prompt = "a script asks"
    alice, bob = bearer(server, TOKEN_A), bearer(server, TOKEN_B)
    stream, conversation = await alice.chat(prompt)
    async with alice.sse(stream) as sse:
        assert_whole_answer(fold(await sse.read_to_end()), prompt)
    # The same token, on another connection and without a cookie, is the same user.
    listed = (await alice.get("/api/conversations")).json()["conversations"]
    assert [c["conversation"] for c in listed] == [conversation]

    for method, path in [
        ("GET", f"/api/streams/{stream}"),
        ("POST", f"/api/streams/{stream}/cancel"),
        ("GET", f"/api/conversations/{conversation}"),
    ]:
        assert_error(await bob.request(method, path), 404, "not_found")
    assert (await bob.get("/api/conversations")).json() == {"conversations": []}

    mallory = bearer(server, "not-a-configured-token")
    for method, path, kwargs in [
        ("GET", "/api/conversations", {}),
        ("GET", f"/api/streams/{stream}", {}),
        ("POST", "/api/chat", {"json": chat_body("let me in")}),
    ]:
        assert_error(await mallory.request(method, path, **kwargs), 401, "unauthorized")


async def test_conversations_list_and_detail(server: Server) -> None:
    user = await new_user(server)
    first, second = new_id(), new_id()
    asked: list[tuple[str, str, str]] = []  # (stream, conversation, prompt)
    for prompt, conversation in [
        ("first question", first),
        ("a follow-up question", first),
        ("another topic", second),
    ]:
        stream, _ = await user.chat(prompt, conversation)
        async with user.sse(stream) as sse:
            assert_whole_answer(fold(await sse.read_to_end()), prompt)
        # The next question is asked once the answer is shown and kept.
        await wait_for(lambda: user.answer_saved(conversation, stream))  # noqa: B023
        asked.append((stream, conversation, prompt))

    listed = await user.get("/api/conversations")
    assert listed.status_code == 200
    conversations = listed.json()["conversations"]
    assert [c["conversation"] for c in conversations] == [second, first]  # newest first
    assert [c["title"] for c in conversations] == ["another topic", "first question"]
    for c in conversations:
        assert set(c) == {"conversation", "title", "created", "updated"}
        assert c["created"] <= c["updated"]
    assert conversations[0]["updated"] > conversations[1]["updated"]

    detail = await user.get(f"/api/conversations/{first}")
    assert detail.status_code == 200
    body = detail.json()
    assert set(body) == {"conversation", "title", "messages"}
    assert (body["conversation"], body["title"]) == (first, "first question")
    messages = body["messages"]
    for m in messages:
        assert {"id", "role", "text", "complete", "created"} <= set(m)
    assert [(m["role"], m["text"], m["complete"]) for m in messages] == [
        ("user", "first question", True),
        ("assistant", demo_reply("first question"), True),
        ("user", "a follow-up question", True),
        ("assistant", demo_reply("a follow-up question"), True),
    ]
    assert [m["id"] for m in messages if m["role"] == "user"] == [asked[0][0], asked[1][0]]
    created = [m["created"] for m in messages]
    assert created == sorted(created)  # oldest first

    other = (await user.get(f"/api/conversations/{second}")).json()["messages"]
    assert [(m["role"], m["text"]) for m in other] == [
        ("user", "another topic"),
        ("assistant", demo_reply("another topic")),
    ]
    assert_error(await user.get(f"/api/conversations/{new_id()}"), 404, "not_found")


# ---- backpressure and shutdown --------------------------------------------------------------


async def test_slow_sse_client_is_ended_then_resumes_exactly_once(make_server: Any) -> None:
    paragraphs = 400
    prompt = "flood me over sse"
    server = make_server(
        outbox_bytes=16 * 1024,
        send_buffer_bytes=16 * 1024,
        demo_tokens_per_second=0,
        demo_first_token_delay=0,
        demo_paragraphs=paragraphs,
        stream_max_tokens=1_000_000,
    )
    expected = demo_reply(prompt, paragraphs)
    user = await new_user(server)
    # The GET below arrives a few hundred tokens into the generation, so it soon follows
    # live tokens: those are what overflow (catching up from the log is flow controlled).
    stream, _ = await user.chat(prompt)
    # httpx would keep reading into its own buffers: a raw socket with a small receive
    # buffer stops reading for real, so the server's sends block.
    head = "\r\n".join(
        [
            f"GET /api/streams/{stream} HTTP/1.1",
            f"Host: 127.0.0.1:{server.port}",
            "Accept: text/event-stream",
            f"Cookie: {user.cookie}",
            "Connection: close",
        ]
    )
    sock = await raw_request(server, head, rcvbuf=4096)
    await wait_for(lambda: server.metrics()["tokenwire_slow_consumer_closes_total"] == 1)
    raw = parse_response(await read_until_eof(sock))
    assert raw.status == 200
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.complete  # ended by the server (last chunk sent), not cut off
    received = parse_events(raw.body)
    seen = fold(received.events)
    assert seen.end is None  # ended early, before `done`
    assert seen.max_n > 1  # pending tokens were joined before giving up
    assert expected.startswith(seen.text)
    assert (seen.duplicates, seen.gaps) == (0, 0)
    assert received.last_event_id == str(seen.last)

    async with user.sse(stream, last_event_id=received.last_event_id) as sse:
        events = await sse.read_to_end(timeout=60)
    assert_whole_answer(fold(events, seen), prompt, paragraphs)


async def test_sigterm_ends_sse_responses_lets_the_answer_finish_and_exits(
    make_server: Any,
) -> None:
    shutdown_timeout = 10
    # 100 tokens a second: the answer takes about 2.5 s, within the grace period.
    server = make_server(demo_tokens_per_second=100, shutdown_timeout=shutdown_timeout)
    prompt = "interrupted over sse"
    user = await new_user(server)
    stream, conversation = await user.chat(prompt)
    async with user.sse(stream) as sse:
        await sse.until(is_token_from(1))
        server.proc.terminate()
        started = time.monotonic()
        # Promptly: the response ends at once, not when the answer or the grace period do.
        events = await sse.read_to_end(timeout=shutdown_timeout / 2)
        ended_after = time.monotonic() - started
    assert sse.ended, "the response was cut, not ended"
    assert ended_after < shutdown_timeout / 2
    view = fold(events)
    assert view.end is None and demo_reply(prompt).startswith(view.text)
    assert len(view.text) < len(demo_reply(prompt)), "the response ended with the answer"
    assert (view.duplicates, view.gaps) == (0, 0)
    # uvicorn re-raises the signal it handled once its graceful shutdown is done.
    returncode = await asyncio.to_thread(server.proc.wait, shutdown_timeout + 5)
    assert returncode in (0, -signal.SIGTERM)

    # The answer went on after the response ended, and was saved whole and complete.
    from backend.storage.history import SqliteHistory

    history = await SqliteHistory.open(server.env["TOKENWIRE_DB"])
    try:
        messages = await history.messages(user.cookie.split("=", 1)[1].split(".")[0], conversation)
    finally:
        await history.aclose()
    assert messages is not None
    assert [(m.role, m.text, m.complete) for m in messages] == [
        ("user", prompt, True),
        ("assistant", demo_reply(prompt), True),
    ]
