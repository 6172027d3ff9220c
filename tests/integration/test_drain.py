"""Graceful drain on SIGTERM: a node stops accepting, tells its clients 1001, refuses new
chats, lets the running generations finish into the log within the grace period, stops
whatever is left, and exits.

First in one process (the `Runtime` as the app's lifespan opens it: real memory parts, a
real SQLite history, the demo model), then with two real nodes, a real redis-server and the
in-test balancer: the clients of the draining node continue on the other one, and see every
answer whole, exactly once, ending `done` `stop`. The single-node SIGTERM tests through a
real server are in test_websocket.py and test_http.py.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from backend.chat.service import Drained, stream_key
from backend.protocol import DoneFrame, ErrorFrame, ProtocolError
from backend.providers import demo_reply, demo_tokens
from backend.runtime import Runtime
from backend.settings import Settings
from harness.server import TIMEOUT, Client, Server, start_chat, wait_for
from tests.integration.test_multinode import (
    assert_complete,
    begin_chat,
    connect_landing_on,
    connect_to,
    name_of,
    request,
    start_node,
    token_of,
)
from tests.support.balancer import Balancer

# ---- one process: the Runtime ------------------------------------------------------------


@asynccontextmanager
async def running(tmp_path: Path, **settings: Any) -> AsyncIterator[Runtime]:
    runtime = Runtime(
        Settings(db=str(tmp_path / "history.db"), demo_first_token_delay=0.0, **settings)
    )
    async with runtime.lifespan():
        yield runtime


async def saved_answer(runtime: Runtime, user: str, conversation: str) -> tuple[str, bool]:
    messages = await runtime.history.messages(user, conversation)
    assert messages is not None
    assert [m.role for m in messages] == ["user", "assistant"]
    return messages[1].text, messages[1].complete


async def test_drain_refuses_new_chats_and_lets_running_ones_finish(tmp_path: Path) -> None:
    prompt = "finish me while draining"
    async with running(tmp_path, demo_tokens_per_second=200) as runtime:
        chat = runtime.chat
        assert (await chat.start("ann", "s1", "c1", prompt, origin="test")).new
        drain = asyncio.create_task(runtime.drain(grace=TIMEOUT))
        await asyncio.sleep(0)  # the drain's first step: new chats are refused from now on
        assert chat.active_streams == 1
        for user, id in (("bob", "s2"), ("ann", "s3")):
            with pytest.raises(ProtocolError) as refused:
                await chat.start(user, id, "c2", "too late", origin="test")
            frame = refused.value.frame
            assert (frame.code, frame.retryable, frame.id) == ("shutting_down", True, id)
        assert await asyncio.wait_for(drain, TIMEOUT) == Drained(finished=1, stopped=0)

        piece = await runtime.log.read_after(stream_key("ann", "s1"), 0, 100_000)
        assert "".join(piece.tokens) == demo_reply(prompt)
        assert piece.end == DoneFrame(id="s1", seq=len(demo_tokens(prompt)), reason="stop")
        assert await saved_answer(runtime, "ann", "c1") == (demo_reply(prompt), True)
        assert chat.active_streams == 0


async def test_drain_stops_what_is_still_running_when_the_grace_period_ends(
    tmp_path: Path,
) -> None:
    prompt = "too slow for the grace period"
    # 20 tokens a second: the answer would take about 12 s; the grace period is 0.5 s.
    async with running(tmp_path, demo_tokens_per_second=20) as runtime:
        await runtime.chat.start("ann", "s1", "c1", prompt, origin="test")
        drained = await asyncio.wait_for(runtime.drain(grace=0.5), TIMEOUT)
        assert drained == Drained(finished=0, stopped=1)

        piece = await runtime.log.read_after(stream_key("ann", "s1"), 0, 100_000)
        assert isinstance(piece.end, ErrorFrame)
        assert (piece.end.code, piece.end.retryable) == ("shutting_down", True)
        shown = "".join(piece.tokens)
        assert demo_reply(prompt).startswith(shown) and shown != demo_reply(prompt)
        assert await saved_answer(runtime, "ann", "c1") == (shown, False)


async def test_drain_waits_for_a_chat_being_accepted_as_it_begins(tmp_path: Path) -> None:
    prompt = "accepted as the drain began"
    async with running(tmp_path, demo_tokens_per_second=200) as runtime:
        starting = asyncio.create_task(runtime.chat.start("ann", "s1", "c1", prompt, origin="test"))
        await asyncio.sleep(0)  # past the shutdown check, its acceptance not yet done
        assert await asyncio.wait_for(runtime.drain(grace=TIMEOUT), TIMEOUT) == Drained(1, 0)
        assert (await starting).new
        assert await saved_answer(runtime, "ann", "c1") == (demo_reply(prompt), True)


async def test_drain_with_nothing_running(tmp_path: Path) -> None:
    async with running(tmp_path) as runtime:
        assert await asyncio.wait_for(runtime.drain(grace=TIMEOUT), TIMEOUT) == Drained(0, 0)


# The force quit skips the app's shutdown; uvicorn then raises the two SIGINTs it captured
# again, asyncio's handler turns the second into a KeyboardInterrupt, and the lifespan still
# waiting for its shutdown reports it: "ERROR uvicorn.error: Traceback ... KeyboardInterrupt".
@pytest.mark.server_log(r"(?m)^KeyboardInterrupt$")
async def test_a_second_ctrl_c_cuts_the_drain_short(make_server: Callable[..., Server]) -> None:
    # A grace period far longer than the test's patience: only the force quit ends it.
    server = make_server(shutdown_timeout=600, demo_tokens_per_second=5, log_level="info")
    client = await Client.connect(server)
    stream, _ = await start_chat(client, "a very slow answer")
    await client.until(lambda f: f["type"] == "token" and f.get("id") == stream)
    server.proc.send_signal(signal.SIGINT)
    assert await client.drain_until_closed() == 1001
    await wait_for(lambda: "draining:" in server.log())
    server.proc.send_signal(signal.SIGINT)
    await asyncio.to_thread(server.proc.wait, TIMEOUT)  # not 600 s
    assert "drained in" not in server.log()


# ---- two nodes and Redis --------------------------------------------------------------------

GRACE = 10.0
CLIENTS = 3


async def test_sigterm_on_a_node_its_clients_continue_on_the_other_without_loss(
    make_server: Callable[..., Server], redis_url: str
) -> None:
    # 50 tokens a second: each answer lasts about 5 s, so the drain lands mid-stream and
    # the answers are still being generated on A while their clients resume on B.
    # Heartbeats of 5 s: a client is not read while the test reconnects the others.
    pace = {"demo_tokens_per_second": 50, "heartbeat": 5, "heartbeat_timeout": 5}
    a = start_node(make_server, redis_url, "a", shutdown_timeout=GRACE, log_level="info", **pace)
    b = start_node(make_server, redis_url, "b", **pace)
    prompts = [f"drain me gently, number {i}" for i in range(CLIENTS)]
    async with Balancer([("127.0.0.1", a.port), ("127.0.0.1", b.port)]) as balancer:
        # Users of their own, each connected to A, each with an answer A generates.
        clients = [await connect_landing_on(balancer, name_of(a)) for _ in prompts]
        chats = [await begin_chat(c, p) for c, p in zip(clients, prompts, strict=True)]
        await asyncio.gather(
            *(c.until(token_of(s, 5)) for c, (s, _) in zip(clients, chats, strict=True))
        )

        a.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        codes = await asyncio.gather(*(c.drain_until_closed() for c in clients))
        assert codes == [1001] * CLIENTS
        views = [c.view(s) for c, (s, _) in zip(clients, chats, strict=True)]
        for view, prompt in zip(views, prompts, strict=True):
            assert view.end is None and view.last < len(demo_tokens(prompt)), "not mid-stream"

        # Each page reconnects at once, through the balancer: A no longer accepts, so it
        # lands on B, and resumes from what it showed.
        again = [await connect_to(balancer, c.cookie) for c in clients]
        assert [c.hello["node"] for c in again] == [name_of(b)] * CLIENTS
        for client, (stream, _), view in zip(again, chats, views, strict=True):
            await client.resume(stream, view)
        ended = await asyncio.gather(
            *(c.until_end(s) for c, (s, _) in zip(again, chats, strict=True))
        )
        for view, seen, prompt in zip(ended, views, prompts, strict=True):
            assert view is seen
            assert_complete(view, prompt)  # the whole text once, in order, `done` `stop`

        for client, (_, conversation), prompt in zip(again, chats, prompts, strict=True):
            response = await request(b, "GET", f"/api/conversations/{conversation}", client.cookie)
            assert response.status_code == 200, response.text
            messages = [(m["role"], m["text"], m["complete"]) for m in response.json()["messages"]]
            assert messages == [("user", prompt, True), ("assistant", demo_reply(prompt), True)]

        # A exits within its grace period (and the second uvicorn needs at most to close).
        returncode = await asyncio.to_thread(a.proc.wait, GRACE + 5)
        assert returncode in (0, -signal.SIGTERM)
        assert time.monotonic() - signalled < GRACE + 2
        assert f"{CLIENTS} clients told to go away" in a.log()
        assert f"generations: {CLIENTS} finished, 0 stopped" in a.log()
        for client in again:
            await client.close()
