"""The chat page in a real browser: what a user sees, under MicroPython and Pyodide."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from backend.providers import demo_reply
from e2e.chat_page import ChatPage, shown_text
from harness.server import Server

RUNTIMES = ["micropython", "pyodide"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_answer_streams_from_the_pages_own_origin(page: Page, server: Server, runtime: str) -> None:
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    chat = ChatPage(page, server).open(runtime)
    chat.send("Explain streaming, please")
    # The user's message shows at once, the answer word by word, then final.
    expect(page.locator(".msg.user").last).to_have_text("Explain streaming, please")
    text = chat.wait_answer_status("done")
    assert text == shown_text(demo_reply("Explain streaming, please"))
    assert [(m["role"], m["text"], m["complete"]) for m in chat.history()] == [
        ("user", "Explain streaming, please", True),
        ("assistant", demo_reply("Explain streaming, please"), True),
    ]
    foreign = [u for u in requests if not u.startswith(server.url) and not u.startswith("data:")]
    assert foreign == []
    # The answer's markdown is rendered as elements, not as text with markers.
    answer = chat.assistant()
    expect(answer.locator("pre code")).to_have_count(1)
    assert answer.locator("li").count() >= 1
    expect(page.locator("#input")).to_be_enabled()


def test_stop_cancels_the_answer(page: Page, server: Server) -> None:
    chat = ChatPage(page, server).open()
    chat.send("Stop me early")
    chat.wait_tokens(40)
    page.click("#stop")
    text = chat.wait_answer_status("cancelled")
    assert shown_text(demo_reply("Stop me early")).startswith(text)
    expect(page.locator("#stop")).to_be_hidden()
    history = chat.history()
    assert history[-1]["role"] == "assistant"
    assert history[-1]["complete"] is False
    assert demo_reply("Stop me early").startswith(history[-1]["text"])


def test_input_stays_usable_while_streaming(page: Page, server: Server) -> None:
    chat = ChatPage(page, server).open()
    chat.send("First question")
    chat.wait_tokens(10)
    chat.send("Second question")
    assert chat.wait_answer_status("done", 0) == shown_text(demo_reply("First question"))
    assert chat.wait_answer_status("done", 1) == shown_text(demo_reply("Second question"))
    texts = [m["text"] for m in chat.history() if m["role"] == "user"]
    assert texts == ["First question", "Second question"]


def test_reload_mid_stream_continues_the_answer(page: Page, server: Server) -> None:
    chat = ChatPage(page, server).open()
    chat.send("Survive a reload")
    chat.wait_tokens(60)
    page.reload()
    chat.wait_ready()
    expect(page.locator(".msg.user")).to_have_text(["Survive a reload"])
    assert chat.wait_answer_status("done") == shown_text(demo_reply("Survive a reload"))
    expect(page.locator(".msg.assistant")).to_have_count(1)


def test_user_and_model_text_never_become_html(page: Page, server: Server) -> None:
    chat = ChatPage(page, server).open()
    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script> **bold**'
    chat.send(hostile)
    chat.wait_answer_status("done")
    expect(page.locator(".msg.user").last).to_have_text(hostile)
    assert page.locator(".messages img, .messages script").count() == 0
    assert page.evaluate("window.pwned") is None


def test_conversations_can_be_created_and_switched(page: Page, server: Server) -> None:
    chat = ChatPage(page, server).open()
    chat.send("About apples")
    chat.wait_answer_status("done")
    first = chat.current_conversation()
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    chat.send("About pears")
    chat.wait_answer_status("done")
    links = page.locator("#conversations a")
    expect(links).to_have_count(2)
    page.click(f'#conversations a[data-conversation="{first}"]')
    expect(page.locator(".msg.user")).to_have_text(["About apples"])
    expect(page.locator("#title")).to_have_text("About apples")
    assert re.fullmatch(r"[0-9a-f]{32}", first)


def test_falls_back_to_sse_when_websocket_is_blocked(page: Page, server: Server) -> None:
    attempts: list[str] = []

    def refuse(ws):  # type: ignore[no-untyped-def]
        attempts.append(ws.url)
        ws.close(code=1006)

    page.route_web_socket(re.compile(".*/ws$"), refuse)
    chat = ChatPage(page, server).open()
    chat.send("Over SSE, please")
    assert chat.wait_answer_status("done") == shown_text(demo_reply("Over SSE, please"))
    assert len(attempts) >= 3
    assert [m["role"] for m in chat.history()] == ["user", "assistant"]
