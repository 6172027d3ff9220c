"""Containment: a failure of our own code breaks the one frame, connection or request it hit,
and nothing else. Against a real server (`python -m tests.support.faults`: tokenwire with a few
bugs planted, see tests/support/faults.py), over both WebSocket servers.

- A frame that fails is answered `internal` (retryable) with its id; its connection, and the
  streams on it, carry on.
- A connection whose machinery fails is closed with 1011; every other connection, and the
  generation itself, carry on.
- A stream whose delivery to one client fails ends for that client with `internal`; the
  connection and its other streams carry on.
- An HTTP request that fails is answered 500 with the JSON error body; an SSE response that
  fails ends with an `internal` error event.

Each is logged once, with its traceback, and counted in `/metrics`; never does asyncio
report a fatal transport error or a task exception nobody retrieved.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from backend.protocol import CLOSE_INTERNAL_ERROR, INTERNAL, RETRYABLE
from backend.providers import demo_reply
from harness.server import TIMEOUT, Client, Server, new_id, start_chat
from tests.support.faults import CONNECTION_FAULT, FILL_FAULT, FRAME_FAULT, SSE_FAULT
from tests.support.sse_client import SseParser

pytestmark = pytest.mark.server_log(r"PlantedFault")

WEBSOCKET_SERVERS = ["wire", "uvicorn"]
_CONTAINED = re.compile(r'tokenwire_contained_failures_total\{place="(\w+)"\}')


@pytest.fixture(params=WEBSOCKET_SERVERS)
def faulty(request: pytest.FixtureRequest, make_server: Callable[..., Server]) -> Server:
    return make_server(module="tests.support.faults", websocket_server=request.param)


def contained(server: Server) -> dict[str, float]:
    """`tokenwire_contained_failures_total` by place."""
    samples = server.metrics().items()
    return {m[1]: v for k, v in samples if (m := _CONTAINED.fullmatch(k))}


def problem_lines(server: Server) -> list[str]:
    log = server.log()
    return [
        line
        for line in log.splitlines()
        if "Fatal error" in line or "never retrieved" in line or "Exception in ASGI" in line
    ]


async def test_a_failing_frame_is_answered_internal_and_the_connection_carries_on(
    faulty: Server,
) -> None:
    client = await Client.connect(faulty)
    try:
        running, _ = await start_chat(client, "a neighbour on the same connection")
        failing = new_id()
        await client.send(type="chat", id=failing, conversation=new_id(), text=FRAME_FAULT)
        error = await client.until(lambda f: f["type"] == "error" and f["id"] == failing)
        assert error["code"] == INTERNAL and error["retryable"] is RETRYABLE[INTERNAL] is True
        assert "PlantedFault" not in json.dumps(error)  # no exception text reaches a client
        # The stream that was running on the connection ends exactly, and the connection
        # goes on: a ping is answered, and a new chat streams exactly.
        view = await client.until_end(running)
        assert view.text == demo_reply("a neighbour on the same connection")
        assert (view.duplicates, view.gaps) == (0, 0)
        await client.send(type="ping", t=7)
        assert (await client.until(lambda f: f["type"] == "pong"))["t"] == 7
        after, _ = await start_chat(client, "and after it")
        assert (await client.until_end(after)).text == demo_reply("and after it")
    finally:
        await client.close()
    assert contained(faulty) == {"frame": 1, "connection": 0, "delivery": 0, "http": 0, "loop": 0}
    log = faulty.log()
    assert log.count("a chat frame failed; answered internal") == 1
    assert log.count("PlantedFault: a planted bug in ChatService.start") == 1
    assert problem_lines(faulty) == []


async def test_a_failing_connection_closes_with_1011_and_nothing_else(faulty: Server) -> None:
    neighbour = await Client.connect(faulty)
    victim = await Client.connect(faulty)
    try:
        theirs, _ = await start_chat(neighbour, "the neighbour streams on")
        doomed = CONNECTION_FAULT + new_id()
        await victim.send(type="chat", id=doomed, conversation=new_id(), text="doomed")
        with pytest.raises(ConnectionClosed) as closed:
            await victim.until(lambda f: False)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == CLOSE_INTERNAL_ERROR
        # Another connection's stream is untouched ...
        view = await neighbour.until_end(theirs)
        assert view.text == demo_reply("the neighbour streams on")
        assert (view.duplicates, view.gaps) == (0, 0)
    finally:
        await neighbour.close()
        await victim.close()
    # ... and so is the generation of the stream whose frames failed to write: its whole
    # answer is in the log, readable over SSE by the same user.
    assert sse_text(faulty, victim.cookie, doomed) == demo_reply("doomed")
    # The user reconnects as the protocol says (1011: reconnect) and carries on.
    again = await Client.connect(faulty, cookie=victim.cookie)
    try:
        stream, _ = await start_chat(again, "after the reconnect")
        assert (await again.until_end(stream)).text == demo_reply("after the reconnect")
    finally:
        await again.close()
    counts = contained(faulty)
    assert counts["connection"] == 1 and counts["frame"] == counts["loop"] == 0
    assert faulty.log().count("closing it with 1011") == 1
    assert problem_lines(faulty) == []


async def test_a_failing_delivery_ends_that_stream_for_that_client_alone(faulty: Server) -> None:
    client = await Client.connect(faulty)
    try:
        running, _ = await start_chat(client, "streams beside it")
        failing = FILL_FAULT + new_id()
        await client.send(type="chat", id=failing, conversation=new_id(), text="it fails")
        ack = await client.until(lambda f: f.get("id") == failing)
        assert ack["type"] == "ack"
        end = await client.until(lambda f: f.get("id") == failing)
        assert end["type"] == "error"
        assert (end["code"], end["retryable"]) == (INTERNAL, True)
        view = await client.until_end(running)
        assert view.text == demo_reply("streams beside it")
        assert (view.duplicates, view.gaps) == (0, 0)
        await client.send(type="ping", t=8)
        assert (await client.until(lambda f: f["type"] == "pong"))["t"] == 8
    finally:
        await client.close()
    counts = contained(faulty)
    assert counts["delivery"] >= 1 and counts["frame"] == counts["connection"] == 0
    assert problem_lines(faulty) == []


def sse_text(server: Server, cookie: str, stream: str) -> str:
    parser = SseParser()
    with httpx.stream(
        "GET", f"{server.url}/api/streams/{stream}", headers={"Cookie": cookie}, timeout=TIMEOUT
    ) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            parser.feed(chunk)
    frames: list[dict[str, Any]] = [e.data for e in parser.events]
    assert frames[-1]["type"] == "done", frames[-1]
    return "".join(f["data"] for f in frames if f["type"] == "token")


def test_a_failing_http_request_is_a_500_with_the_json_error(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(module="tests.support.faults")
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        failed = http.post(
            "/api/chat", json={"id": new_id(), "conversation": new_id(), "text": FRAME_FAULT}
        )
        assert failed.status_code == 500
        body = failed.json()
        assert (body["code"], body["retryable"]) == (INTERNAL, True)
        assert "PlantedFault" not in failed.text and "Traceback" not in failed.text
        # The next request of the same client is served as usual.
        ok = http.post("/api/chat", json={"id": new_id(), "conversation": new_id(), "text": "hi"})
        assert ok.status_code == 202
    assert contained(server)["http"] == 1
    assert problem_lines(server) == []


def test_a_failing_sse_response_ends_with_an_internal_event(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(module="tests.support.faults")
    stream = SSE_FAULT + new_id()
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        started = http.post(
            "/api/chat", json={"id": stream, "conversation": new_id(), "text": "over sse"}
        )
        assert started.status_code == 202
        parser = SseParser()
        with http.stream("GET", f"/api/streams/{stream}") as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                parser.feed(chunk)
    (event,) = parser.events  # its first token failed to write: the response ends at once
    assert event.event == "error"
    assert (event.data["code"], event.data["id"], event.data["retryable"]) == (
        INTERNAL,
        stream,
        True,
    )
    assert contained(server)["http"] == 1
    assert problem_lines(server) == []
