"""The network drops mid-stream, in every way FIELD-NOTES.md lists: what the user finally
sees is every answer exactly once, and the server's history agrees.

Silent outages (offline, a black hole) are found by the `offline` event and the heartbeat;
hard ones (a cut, a dead server) by the socket's close. The page is opened through a
`TcpProxy` wherever the test breaks the network between browser and server. The servers
here ping every second and give up after one more: the client's watchdog fires after two.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Iterator

import pytest
from playwright.sync_api import Page, WebSocketRoute, expect

from backend.providers import demo_reply
from e2e.chat_page import ChatPage, shown_text
from e2e.conftest import E2E_DEMO
from e2e.proxy import TcpProxy
from harness.server import Server, restart, start_server

FAST_HEARTBEAT = {"heartbeat": 1, "heartbeat_timeout": 1}
# How long each outage lasts (a scenario parameter, not a wait for something): longer than
# the watchdog's heartbeat + timeout, shorter than the rest of the answer.
OUTAGE = 3.0
SHORT_OUTAGE = 1.5  # a cut is seen at once: this short, the answer is still streaming after
RECOVERY_TIMEOUT = 15_000  # ms: the reconnect backoff (1, 2, 4 s + jitter) and a resume


@pytest.fixture(scope="module")
def net_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("network"), **E2E_DEMO, **FAST_HEARTBEAT)
    yield srv
    srv.stop(signal.SIGKILL)


@pytest.fixture
def proxy(net_server: Server) -> Iterator[TcpProxy]:
    with TcpProxy(net_server.port) as p:
        yield p


@pytest.fixture
def crash_and_restart() -> Iterator[Callable[[Server], Server]]:
    """SIGKILL a server and start it again on its port; the new one is killed at the end."""
    restarted: list[Server] = []

    def crash(server: Server) -> Server:
        server.stop(signal.SIGKILL)
        new = restart(server)
        restarted.append(new)
        return new

    yield crash
    for srv in restarted:
        srv.stop(signal.SIGKILL)


def outage(page: Page, seconds: float = OUTAGE) -> None:
    """Keep the network broken this long (the outage's length is the scenario)."""
    page.wait_for_timeout(seconds * 1000)


def expect_reconnected(chat: ChatPage) -> None:
    expect(chat.status).to_be_hidden(timeout=RECOVERY_TIMEOUT)
    # An outage says nothing against WebSocket: the client must not fall back to SSE.
    expect(chat.page.locator("#app")).to_have_attribute("data-transport", "ws")


def assert_answered_once(chat: ChatPage, prompts: list[str]) -> None:
    """Each prompt shown once, answered once with the whole demo text, nothing left
    pending; the server stored each question once, in order, and each complete answer."""
    page = chat.page
    for i, prompt in enumerate(prompts):
        assert chat.wait_answer_status("done", i) == shown_text(demo_reply(prompt))
    expect(page.locator(".msg.assistant")).to_have_count(len(prompts))
    expect(page.locator(".msg.user")).to_have_text(prompts)
    expect(chat.pending).to_have_count(0)
    expected = []
    for prompt in prompts:
        expected += [("user", prompt, True), ("assistant", demo_reply(prompt), True)]
    assert [(m["role"], m["text"], m["complete"]) for m in chat.history()] == expected


# ---- the connection drops mid-stream ---------------------------------------------------


def test_going_offline_mid_stream(page: Page, net_server: Server) -> None:
    chat = ChatPage(page, net_server).open()
    chat.send("Offline for a bit")
    chat.wait_tokens(40)
    page.context.set_offline(True)
    expect(chat.status).to_be_visible()  # the `offline` event: no need to wait for silence
    outage(page)
    page.context.set_offline(False)
    expect_reconnected(chat)
    assert_answered_once(chat, ["Offline for a bit"])


@pytest.mark.parametrize(
    ("how", "runtime"),
    [("fin", "micropython"), ("rst", "micropython"), ("rst", "pyodide")],
    ids=["fin", "rst", "rst-pyodide"],
)
def test_a_cut_connection_reconnects_and_resumes(
    page: Page, net_server: Server, proxy: TcpProxy, how: str, runtime: str
) -> None:
    chat = ChatPage(page, net_server, proxy.url).open(runtime)
    chat.send("Cut me off")
    chat.wait_tokens(40)
    proxy.cut(how)  # type: ignore[arg-type]
    expect(chat.status).to_be_visible()
    outage(page, SHORT_OUTAGE)
    proxy.heal()
    expect_reconnected(chat)
    assert_answered_once(chat, ["Cut me off"])


def test_a_black_hole_is_found_by_the_heartbeat(
    page: Page, net_server: Server, proxy: TcpProxy
) -> None:
    chat = ChatPage(page, net_server, proxy.url).open()
    chat.send("Into the void")
    chat.wait_tokens(40)
    proxy.black_hole()
    # Nothing reaches the page: only the watchdog (heartbeat + timeout, 2 s) notices.
    expect(chat.status).to_be_visible(timeout=5_000)
    outage(page)
    proxy.heal()
    expect_reconnected(chat)
    assert_answered_once(chat, ["Into the void"])


def test_a_crashed_server_leaves_the_answer_incomplete_with_retry(
    page: Page,
    make_server: Callable[..., Server],
    crash_and_restart: Callable[[Server], Server],
) -> None:
    server = make_server(**FAST_HEARTBEAT)
    chat = ChatPage(page, server).open()
    prompt = "Survive a crash"
    chat.send(prompt)
    chat.wait_tokens(40)
    first = chat.assistant().get_attribute("data-id")
    # The generation and its in-memory log die with the process; history (SQLite) stays.
    server = crash_and_restart(server)
    chat.server = server
    text = chat.wait_answer_status("failed")
    assert text and shown_text(demo_reply(prompt)).startswith(text)
    answer = chat.assistant()
    expect(answer.locator(".meta")).to_contain_text("incomplete")
    expect_reconnected(chat)
    answer.get_by_role("button", name="Retry").click()
    assert chat.wait_answer_status("done") == shown_text(demo_reply(prompt))
    expect(page.locator(".msg.assistant")).to_have_count(1)
    expect(page.locator(".msg.user")).to_have_text([prompt])
    retried = chat.assistant().get_attribute("data-id")
    assert retried != first
    history = chat.history()
    assert [m["text"] for m in history if m["role"] == "user"] == [prompt, prompt]
    answers = {m["id"]: m for m in history if m["role"] == "assistant"}
    # The first answer never completed: the server has it incomplete, or not at all.
    assert first not in answers or answers[first]["complete"] is False
    assert (answers[retried]["text"], answers[retried]["complete"]) == (demo_reply(prompt), True)


# ---- messages typed while disconnected ------------------------------------------------


@pytest.mark.parametrize("runtime", ["micropython", "pyodide"])
def test_messages_typed_offline_are_sent_in_order(
    page: Page, net_server: Server, runtime: str
) -> None:
    chat = ChatPage(page, net_server).open(runtime)
    chat.send("First, online")
    chat.wait_tokens(40)  # its answer is cut too, and resumed beside the queue
    page.context.set_offline(True)
    expect(chat.status).to_be_visible()
    chat.send("Second, offline")
    chat.send("Third, offline")
    expect(chat.pending_texts).to_have_text(["Second, offline", "Third, offline"])
    outage(page)
    page.context.set_offline(False)
    expect_reconnected(chat)
    assert_answered_once(chat, ["First, online", "Second, offline", "Third, offline"])


def test_messages_typed_into_a_black_hole_are_sent_after_it(
    page: Page, net_server: Server, proxy: TcpProxy
) -> None:
    chat = ChatPage(page, net_server, proxy.url).open()
    chat.send("Before the hole")
    chat.wait_tokens(40)
    proxy.black_hole()
    expect(chat.status).to_be_visible(timeout=5_000)
    chat.send("In the hole")
    chat.send("Still in it")
    expect(chat.pending_texts).to_have_text(["In the hole", "Still in it"])
    outage(page)
    proxy.heal()
    expect_reconnected(chat)
    assert_answered_once(chat, ["Before the hole", "In the hole", "Still in it"])


@pytest.mark.parametrize("runtime", ["micropython", "pyodide"])
def test_queued_messages_survive_a_reload_while_offline(
    page: Page, net_server: Server, runtime: str
) -> None:
    chat = ChatPage(page, net_server).open(runtime)
    chat.send("Before the reload")
    chat.wait_tokens(40)
    chat.wait_offline_ready()
    page.context.set_offline(True)
    chat.send("Queued, then reloaded")
    chat.send("Queued too")
    expect(chat.pending).to_have_count(2)
    # The page itself (and the interpreter) comes from the service worker, the queue from
    # localStorage; the conversation and the cut answer come back once connected.
    page.reload()
    chat.wait_ready()
    expect(chat.pending_texts).to_have_text(["Queued, then reloaded", "Queued too"])
    expect(chat.status).to_be_visible()
    outage(page)
    page.context.set_offline(False)
    expect_reconnected(chat)
    assert_answered_once(chat, ["Before the reload", "Queued, then reloaded", "Queued too"])


def test_cancelled_queued_messages_are_never_sent(page: Page, net_server: Server) -> None:
    chat = ChatPage(page, net_server).open()
    chat.send("Sent before")
    chat.wait_tokens(40)
    cancel_all = page.locator("#cancel-queued")
    expect(cancel_all).to_be_hidden()

    # One message cancelled with its own button; the one after it still goes.
    page.context.set_offline(True)
    chat.send("Cancel me")
    chat.send("Keep me")
    expect(cancel_all).to_be_visible()
    chat.pending.filter(has_text="Cancel me").get_by_role("button", name="Cancel").click()
    expect(chat.pending_texts).to_have_text(["Keep me"])
    page.context.set_offline(False)
    expect_reconnected(chat)
    assert_answered_once(chat, ["Sent before", "Keep me"])

    # Every queued message of the conversation cancelled at once.
    page.context.set_offline(True)
    chat.send("Drop one")
    chat.send("Drop two")
    expect(chat.pending).to_have_count(2)
    cancel_all.click()
    expect(chat.pending).to_have_count(0)
    expect(cancel_all).to_be_hidden()
    page.context.set_offline(False)
    expect_reconnected(chat)
    # Sent after them: had they gone, the queue's order would have sent them first.
    chat.send("After the cancel")
    assert_answered_once(chat, ["Sent before", "Keep me", "After the cancel"])


def test_stop_while_offline_cancels_once_reconnected(page: Page, net_server: Server) -> None:
    chat = ChatPage(page, net_server).open()
    prompt = "Stop me while offline"
    chat.send(prompt)
    chat.wait_tokens(40)
    page.context.set_offline(True)
    expect(chat.status).to_be_visible()
    page.click("#stop")
    outage(page, SHORT_OUTAGE)
    page.context.set_offline(False)
    # The cancel waited for the connection; the answer stops where the server stopped it.
    text = chat.wait_answer_status("cancelled")
    history = chat.history()
    assert [(m["role"], m["complete"]) for m in history] == [("user", True), ("assistant", False)]
    stored = history[-1]["text"]
    assert demo_reply(prompt).startswith(stored)
    assert len(stored) < len(demo_reply(prompt))
    # Exactly what the server kept, once (a cut-off answer's markdown may end mid-marker,
    # so compare with the stored text, not with a prefix of the whole answer).
    assert text == shown_text(stored)


# ---- the SSE fallback --------------------------------------------------------------------


def test_a_cut_during_an_sse_stream_resumes_once(
    page: Page, net_server: Server, proxy: TcpProxy
) -> None:
    def refuse(ws: WebSocketRoute) -> None:
        ws.close(code=1006)

    page.route_web_socket(re.compile(".*/ws$"), refuse)
    chat = ChatPage(page, net_server, proxy.url).open()
    chat.send("Over SSE, then cut")
    chat.wait_tokens(40)
    expect(page.locator("#app")).to_have_attribute("data-transport", "sse")
    proxy.cut("rst")
    expect(chat.status).to_be_visible()
    outage(page)
    proxy.heal()
    expect(chat.status).to_be_hidden(timeout=RECOVERY_TIMEOUT)
    assert_answered_once(chat, ["Over SSE, then cut"])
