"""The WebSocket protocol end to end: a real server process, a real WebSocket client.

Every streaming test checks what a user would finally see: the demo model's text for the
prompt, exactly once, in order.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from backend.providers import demo_reply, demo_tokens
from backend.settings import WEBSOCKET_SERVERS
from harness.server import TIMEOUT, Client, Server, server_factory, start_chat, wait_for
from tests.conftest import FAST_DEMO

# ---- the protocol table -------------------------------------------------------------------

LONG_ID = "x" * 65
PROTOCOL_CASES: list[tuple[str, Any, dict[str, Any]]] = [
    ("not-json", "hello", {"code": "bad_frame", "id": None}),
    ("json-array", "[1, 2]", {"code": "bad_frame", "id": None}),
    ("binary", b'{"type": "ping", "t": 1}', {"code": "bad_frame", "id": None}),
    ("unknown-type", {"type": "shout"}, {"code": "bad_frame", "id": None}),
    ("no-type", {"id": "a"}, {"code": "bad_frame", "id": "a"}),
    (
        "chat-missing-text",
        {"type": "chat", "id": "m1", "conversation": "c"},
        {"code": "bad_frame", "id": "m1"},
    ),
    (
        "chat-text-not-string",
        {"type": "chat", "id": "m2", "conversation": "c", "text": 5},
        {"code": "bad_frame", "id": "m2"},
    ),
    (
        "chat-id-with-space",
        {"type": "chat", "id": "a b", "conversation": "c", "text": "x"},
        {"code": "bad_frame", "id": None},
    ),
    (
        "chat-id-too-long",
        {"type": "chat", "id": LONG_ID, "conversation": "c", "text": "x"},
        {"code": "bad_frame", "id": None},
    ),
    (
        "chat-id-empty",
        {"type": "chat", "id": "", "conversation": "c", "text": "x"},
        {"code": "bad_frame", "id": None},
    ),
    (
        "conversation-bad",
        {"type": "chat", "id": "m3", "conversation": "../c", "text": "x"},
        {"code": "bad_frame", "id": "m3"},
    ),
    (
        "resume-after-negative",
        {"type": "resume", "id": "r1", "after": -1},
        {"code": "bad_frame", "id": "r1"},
    ),
    (
        "resume-after-string",
        {"type": "resume", "id": "r1", "after": "3"},
        {"code": "bad_frame", "id": "r1"},
    ),
    ("cancel-no-id", {"type": "cancel"}, {"code": "bad_frame", "id": None}),
    (
        "text-too-long",
        {"type": "chat", "id": "m4", "conversation": "c", "text": "y" * 2001},
        {"code": "too_large", "id": "m4"},
    ),
    (
        "frame-too-large",
        {"type": "ping", "t": 1, "pad": "z" * 5000},
        {"code": "too_large", "id": None},
    ),
    (
        "resume-unknown",
        {"type": "resume", "id": "never-used", "after": 0},
        {"code": "not_found", "id": "never-used"},
    ),
    (
        "cancel-unknown",
        {"type": "cancel", "id": "never-used"},
        {"code": "not_found", "id": "never-used"},
    ),
    ("ping", {"type": "ping", "t": 42}, {"type": "pong", "t": 42}),
    ("ping-float", {"type": "ping", "t": 1.5}, {"type": "pong", "t": 1.5}),
]


# Every test on these servers runs over both WebSocket servers: tokenwire's own protocol,
# where connections detach from their ASGI call, and uvicorn's (TOKENWIRE_WEBSOCKET_SERVER).
@pytest.fixture(scope="module", params=WEBSOCKET_SERVERS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with server_factory(tmp_path_factory.mktemp("server"), **FAST_DEMO) as make:
        yield make(websocket_server=request.param)


@pytest.fixture(scope="module", params=WEBSOCKET_SERVERS)
def small_limits(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with server_factory(tmp_path_factory.mktemp("limits"), **FAST_DEMO) as make:
        yield make(max_frame_bytes=4096, max_text_chars=2000, websocket_server=request.param)


@pytest.mark.parametrize(
    ("payload", "expected"), [c[1:] for c in PROTOCOL_CASES], ids=[c[0] for c in PROTOCOL_CASES]
)
async def test_protocol_table(small_limits: Server, payload: Any, expected: dict[str, Any]) -> None:
    client = await Client.connect(small_limits)
    raw = payload if isinstance(payload, str | bytes) else json.dumps(payload)
    await client.ws.send(raw)
    frame = await client.recv()
    if expected.get("type") == "pong":
        assert frame == expected
    else:
        assert frame["type"] == "error"
        assert {k: frame[k] for k in expected} == expected
        assert frame["retryable"] is False
        assert isinstance(frame["message"], str) and frame["message"]
        assert "<" not in frame["message"]
    # The connection survives every bad frame and still streams.
    stream, _ = await start_chat(client, "still alive?")
    view = await client.until_end(stream)
    assert view.text == demo_reply("still alive?")
    await client.close()


async def test_bad_frames_do_not_touch_other_connections(small_limits: Server) -> None:
    victim = await Client.connect(small_limits)
    stream, _ = await start_chat(victim, "keep streaming")
    attacker = await Client.connect(small_limits)
    for payload in [
        "{",
        "[]",
        '{"type":"chat"}',
        "x" * 5000,
        '{"type":"resume","id":"' + stream + '","after":0}',
    ]:
        await attacker.ws.send(payload)
        assert (await attacker.recv())["type"] == "error"
    view = await victim.until_end(stream)
    assert view.text == demo_reply("keep streaming")
    assert (view.duplicates, view.gaps) == (0, 0)


# ---- streaming --------------------------------------------------------------------------


async def test_full_stream(server: Server) -> None:
    client = await Client.connect(server)
    assert client.hello["protocol"] == 1
    assert client.hello["heartbeat"] == 30
    assert client.hello["heartbeat_timeout"] == 10
    assert client.hello["node"] and client.hello["session"]
    stream, _ = await start_chat(client, "Tell me about streaming")
    view = await client.until_end(stream)
    assert view.text == demo_reply("Tell me about streaming")
    assert view.end == {
        "type": "done",
        "id": stream,
        "seq": len(demo_tokens("Tell me about streaming")),
        "reason": "stop",
    }
    assert (view.duplicates, view.gaps) == (0, 0)
    await client.close()


async def test_second_connection_of_the_user_sees_message_and_tokens(server: Server) -> None:
    first = await Client.connect(server)
    second = await Client.connect(server, cookie=first.cookie)
    stream, conversation = await start_chat(first, "two tabs")
    message = await second.until(lambda f: f["type"] == "message")
    assert message == {
        "type": "message",
        "id": stream,
        "conversation": conversation,
        "text": "two tabs",
    }
    # The second tab joined from the first token, so it has everything without resuming.
    for client in (first, second):
        view = await client.until_end(stream)
        assert view.text == demo_reply("two tabs")
    assert not any(f["type"] == "message" for f in first.frames)


async def test_disconnect_reconnect_resume_exactly_once(server: Server) -> None:
    client = await Client.connect(server)
    stream, _ = await start_chat(client, "resume me")
    await client.until(lambda f: f["type"] == "token" and f["seq"] >= 20)
    seen = client.view(stream)
    await client.ws.close()  # the network drops mid-stream

    again = await Client.connect(server, cookie=client.cookie)
    await again.resume(stream, seen)  # the page keeps what it showed
    view = await again.until_end(stream)
    assert view.text == demo_reply("resume me")
    assert (view.duplicates, view.gaps) == (0, 0)


async def test_resume_after_the_stream_ended(server: Server) -> None:
    client = await Client.connect(server)
    stream, _ = await start_chat(client, "finished while away")
    await client.until(lambda f: f["type"] == "token" and f["seq"] >= 5)
    seen = client.view(stream)
    await client.ws.close()
    await wait_for(lambda: server.metrics()["tokenwire_streams_active"] == 0)

    again = await Client.connect(server, cookie=client.cookie)
    await again.resume(stream, seen)
    view = await again.until_end(stream)
    assert view.text == demo_reply("finished while away")
    # Catch-up from the log joins tokens: far fewer frames than tokens.
    assert view.max_n > 1


async def test_repeated_chat_replays_without_a_second_generation(server: Server) -> None:
    client = await Client.connect(server)
    before = server.metrics()["tokenwire_generations_total"]
    stream, conversation = await start_chat(client, "only once")
    await client.until(lambda f: f["type"] == "token" and f["seq"] >= 3)
    await client.ws.close()

    again = await Client.connect(server, cookie=client.cookie)
    await again.send(type="chat", id=stream, conversation=conversation, text="only once")
    ack = await again.until(lambda f: f["type"] in ("ack", "error"))
    assert ack == {"type": "ack", "id": stream, "conversation": conversation}
    view = await again.until_end(stream)
    assert view.text == demo_reply("only once")
    assert (view.duplicates, view.gaps) == (0, 0)
    assert server.metrics()["tokenwire_generations_total"] == before + 1

    # The same id with other content is refused, and changes nothing.
    await again.send(type="chat", id=stream, conversation=conversation, text="different")
    error = await again.until(lambda f: f["type"] == "error")
    assert (error["code"], error["id"]) == ("conflict", stream)
    assert server.metrics()["tokenwire_generations_total"] == before + 1


async def test_chat_repeat_with_after_replays_the_rest(server: Server) -> None:
    client = await Client.connect(server)
    stream, conversation = await start_chat(client, "replay from ten")
    await client.until_end(stream)
    again = await Client.connect(server, cookie=client.cookie)
    await again.send(
        type="chat", id=stream, conversation=conversation, text="replay from ten", after=10
    )
    await again.until(lambda f: f["type"] == "ack")
    first_token = await again.until(lambda f: f["type"] == "token")
    assert first_token["seq"] - first_token.get("n", 1) + 1 == 11
    assert first_token["data"] == "".join(demo_tokens("replay from ten")[10 : first_token["seq"]])


async def test_cancel_mid_stream(server: Server) -> None:
    client = await Client.connect(server)
    stream, _ = await start_chat(client, "stop me")
    await client.until(lambda f: f["type"] == "token" and f["seq"] >= 5)
    await client.send(type="cancel", id=stream)
    view = await client.until_end(stream)
    assert view.end is not None
    assert view.end["reason"] == "cancelled"
    assert view.end["seq"] == view.last
    full = demo_reply("stop me")
    assert full.startswith(view.text) and len(view.text) < len(full)


async def test_cancel_after_reconnect_and_resume(server: Server) -> None:
    client = await Client.connect(server)
    stream, _ = await start_chat(client, "cancel me later")
    await client.until(lambda f: f["type"] == "token" and f["seq"] >= 5)
    seen = client.view(stream)
    await client.ws.close()

    again = await Client.connect(server, cookie=client.cookie)
    await again.resume(stream, seen)
    await again.until(lambda f: f["type"] == "token" and f["id"] == stream)
    await again.send(type="cancel", id=stream)
    view = await again.until_end(stream)
    assert view.end is not None and view.end["reason"] == "cancelled"
    assert demo_reply("cancel me later").startswith(view.text)
    assert (view.duplicates, view.gaps) == (0, 0)


async def test_generation_continues_without_any_client(server: Server) -> None:
    client = await Client.connect(server)
    stream, _ = await start_chat(client, "nobody listens")
    await client.ws.close()
    await wait_for(lambda: server.metrics()["tokenwire_streams_active"] == 0)
    again = await Client.connect(server, cookie=client.cookie)
    await again.send(type="resume", id=stream, after=0)
    view = await again.until_end(stream)
    assert view.text == demo_reply("nobody listens")
    assert view.end is not None and view.end["reason"] == "stop"


async def test_provider_failure_is_an_error_frame_not_a_dead_connection(server: Server) -> None:
    client = await Client.connect(server)
    stream, _ = await start_chat(client, "/fail please")
    view = await client.until_end(stream)
    assert view.end is not None
    assert (view.end["type"], view.end["code"], view.end["retryable"]) == (
        "error",
        "provider_error",
        True,
    )
    assert view.text  # the tokens before the failure were shown
    other, _ = await start_chat(client, "after the failure")
    assert (await client.until_end(other)).text == demo_reply("after the failure")


# ---- ownership and origin -------------------------------------------------------------


async def test_another_users_stream_is_not_found(server: Server) -> None:
    owner = await Client.connect(server)
    stream, _ = await start_chat(owner, "mine")
    stranger = await Client.connect(server)  # no cookie: a new identity
    assert stranger.cookie != owner.cookie
    for frame in ({"type": "resume", "id": stream, "after": 0}, {"type": "cancel", "id": stream}):
        await stranger.send(**frame)
        error = await stranger.until(lambda f: f["type"] == "error")
        assert (error["code"], error["id"]) == ("not_found", stream)
    view = await owner.until_end(stream)
    assert view.text == demo_reply("mine")  # the stranger's cancel did nothing
    assert not any(f.get("id") == stream and f["type"] == "token" for f in stranger.frames)


async def test_forged_cookie_gets_a_new_identity(server: Server) -> None:
    owner = await Client.connect(server)
    stream, _ = await start_chat(owner, "forge")
    user = owner.cookie.split("=", 1)[1].split(".")[0]
    forger = await Client.connect(server, cookie=f"tw_id={user}.AAAAAAAAAAAAAAAAAAAAAA")
    await forger.send(type="resume", id=stream, after=0)
    error = await forger.until(lambda f: f["type"] == "error")
    assert error["code"] == "not_found"


async def test_foreign_origin_is_refused(server: Server) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(server.ws_url, origin="http://evil.example"):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403
    same = await Client.connect(server, origin=f"http://127.0.0.1:{server.port}")
    await same.send(type="ping", t=1)
    assert (await same.recv())["type"] == "pong"


# ---- backpressure, heartbeat, shutdown --------------------------------------------------


async def test_slow_consumer_is_coalesced_then_closed_4001_and_resumes(make_server: Any) -> None:
    paragraphs = 400
    server = make_server(
        outbox_bytes=16 * 1024,
        send_buffer_bytes=16 * 1024,
        demo_tokens_per_second=0,
        demo_first_token_delay=0,
        demo_paragraphs=paragraphs,
        stream_max_tokens=1_000_000,
    )
    expected = demo_reply("flood me", paragraphs)
    # A small receive buffer and a one-frame queue: when the test stops reading, the
    # client stops reading the socket too, and the server's sends block.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    client = await Client.connect(server, sock=sock, max_queue=1)
    stream, _ = await start_chat(client, "flood me")
    await wait_for(lambda: server.metrics()["tokenwire_slow_consumer_closes_total"] == 1)
    code = await client.drain_until_closed()
    assert code == 4001
    seen = client.view(stream)
    assert seen.max_n > 1  # pending tokens were joined before giving up
    assert expected.startswith(seen.text)

    again = await Client.connect(server, cookie=client.cookie)
    await again.resume(stream, seen)
    view = await again.until_end(stream, timeout=60)
    assert view.text == expected
    assert (view.duplicates, view.gaps) == (0, 0)
    assert view.end is not None and view.end["reason"] == "stop"


async def test_heartbeat_closes_silent_connection_and_frees_it(make_server: Any) -> None:
    server = make_server(heartbeat=0.2, heartbeat_timeout=0.2)
    baseline = server.metrics()
    assert baseline["tokenwire_connections"] == 0
    # A client that answers pings stays; one that never does is closed with 4000.
    alive = await Client.connect(server)
    silent = await connect(server.ws_url)
    hello = json.loads(await silent.recv())
    assert hello["heartbeat"] == 0.2
    await wait_for(lambda: server.metrics()["tokenwire_connections"] == 2)
    while silent.close_code is None:
        await alive.recv()  # `alive` answers each ping as it reads it
    assert silent.close_code == 4000
    pings = 0
    while pings < 5:  # several heartbeat rounds, each answered by `recv`
        pings += (await alive.recv())["type"] == "ping"
    metrics = server.metrics()
    assert metrics["tokenwire_connections"] == 1
    assert metrics["tokenwire_subscriptions"] == baseline["tokenwire_subscriptions"] + 1
    assert metrics["tokenwire_heartbeat_timeouts_total"] == 1
    await alive.close()
    await wait_for(lambda: server.metrics()["tokenwire_connections"] == 0)
    assert server.metrics()["tokenwire_subscriptions"] == baseline["tokenwire_subscriptions"]


async def saved_messages(server: Server, client: Client, conversation: str) -> list[Any]:
    """The conversation as the stopped server left it in its SQLite file."""
    from backend.storage.history import SqliteHistory

    history = await SqliteHistory.open(server.env["TOKENWIRE_DB"])
    user = client.cookie.split("=", 1)[1].split(".")[0]
    try:
        messages = await history.messages(user, conversation)
    finally:
        await history.aclose()
    assert messages is not None
    return messages


async def sigterm_mid_answer(server: Server, prompt: str) -> tuple[Client, str, str]:
    """Three clients connected, one answer a few tokens in, then SIGTERM: every client is
    told 1001 and the process exits. The client that asked, its stream and conversation."""
    clients = [await Client.connect(server) for _ in range(3)]
    stream, conversation = await start_chat(clients[0], prompt)
    await clients[0].until(lambda f: f["type"] == "token" and f["seq"] >= 3)
    server.proc.terminate()
    codes = [await c.drain_until_closed() for c in clients]
    assert codes == [1001, 1001, 1001]
    return clients[0], stream, conversation


async def test_sigterm_tells_clients_1001_and_lets_the_answer_finish(make_server: Any) -> None:
    # 100 tokens a second: the answer takes about 2.5 s, well within the grace period.
    server = make_server(shutdown_timeout=10, demo_tokens_per_second=100, log_level="info")
    prompt = "finished after the goodbye"
    client, stream, conversation = await sigterm_mid_answer(server, prompt)
    shown = client.view(stream)
    assert shown.end is None and shown.last < len(demo_tokens(prompt)), "not mid-stream"
    # uvicorn re-raises the signal it handled once its graceful shutdown is done.
    assert await asyncio.to_thread(server.proc.wait, TIMEOUT) in (0, -signal.SIGTERM)

    # The generation went on after its clients were told to go: saved whole and complete.
    messages = await saved_messages(server, client, conversation)
    assert [(m.role, m.text, m.complete) for m in messages] == [
        ("user", prompt, True),
        ("assistant", demo_reply(prompt), True),
    ]
    assert "generations: 1 finished, 0 stopped" in server.log()


async def test_sigterm_stops_an_answer_still_running_when_the_grace_period_ends(
    make_server: Any,
) -> None:
    # 20 tokens a second: the answer would take about 12 s; the grace period is 1 s.
    server = make_server(shutdown_timeout=1, demo_tokens_per_second=20, log_level="info")
    prompt = "interrupted answer"
    client, stream, conversation = await sigterm_mid_answer(server, prompt)
    assert await asyncio.to_thread(server.proc.wait, TIMEOUT) in (0, -signal.SIGTERM)

    # The partial answer was saved as incomplete.
    messages = await saved_messages(server, client, conversation)
    assert [(m.role, m.complete) for m in messages] == [("user", True), ("assistant", False)]
    shown = client.view(stream).text
    assert messages[1].text.startswith(shown) and demo_reply(prompt).startswith(messages[1].text)
    assert len(messages[1].text) < len(demo_reply(prompt))
    assert "generations: 0 finished, 1 stopped" in server.log()
