"""The chat page as a tester sees it: actions a user takes and what the user sees."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from playwright.sync_api import Locator, Page, expect

from harness.server import Server

LOAD_TIMEOUT = 30_000  # ms: Pyodide's first load on a busy 2-core machine
STREAM_TIMEOUT = 30_000


@dataclass
class ChatPage:
    """`origin` is where the page is opened (a proxy in front of the server, say); the
    server's own record (`history`) is always read from the server directly."""

    page: Page
    server: Server
    origin: str | None = None

    def open(self, runtime: str = "micropython") -> ChatPage:
        query = "?runtime=pyodide" if runtime == "pyodide" else ""
        self.page.goto((self.origin or self.server.url) + "/" + query)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        expect(self.page.locator("#app")).to_have_attribute(
            "data-ready", "true", timeout=LOAD_TIMEOUT
        )

    def wait_offline_ready(self) -> None:
        """Wait until the service worker holds everything a reload needs without a network."""
        expect(self.page.locator("html")).to_have_attribute(
            "data-offline-ready", "true", timeout=LOAD_TIMEOUT
        )

    @property
    def status(self) -> Locator:
        """The "Reconnecting…" indicator."""
        return self.page.locator("#status")

    @property
    def pending(self) -> Locator:
        """The user's messages still queued (not yet acknowledged by the server)."""
        return self.page.locator(".msg.user.pending")

    @property
    def pending_texts(self) -> Locator:
        """The texts of `pending` (without their Cancel buttons)."""
        return self.pending.locator(".text")

    def transport(self) -> str:
        value: str = self.page.locator("#app").get_attribute("data-transport") or ""
        return value

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def assistant(self, index: int = -1):  # type: ignore[no-untyped-def]
        messages = self.page.locator(".msg.assistant")
        return messages.nth(index) if index >= 0 else messages.last

    def wait_answer_status(self, status: str, index: int = -1) -> str:
        """Wait until the answer ends with `status`; return the text the user sees."""
        answer = self.assistant(index)
        expect(answer).to_have_attribute("data-status", status, timeout=STREAM_TIMEOUT)
        text: str = answer.locator(".body").evaluate("el => el.textContent")
        return text

    def wait_tokens(self, chars: int, index: int = -1) -> None:
        """Wait until the answer shows at least `chars` characters (mid-stream)."""
        self.page.wait_for_function(
            """([n, i]) => {
                const all = document.querySelectorAll('.msg.assistant .body');
                const el = i >= 0 ? all[i] : all[all.length - 1];
                return el && el.textContent.length >= n;
            }""",
            arg=[chars, index],
            timeout=STREAM_TIMEOUT,
        )

    def cookie_header(self) -> str:
        cookies = self.page.context.cookies(self.server.url)
        return "; ".join(f"{c['name']}={c['value']}" for c in cookies)

    def history(self, conversation: str | None = None) -> list[dict]:  # type: ignore[type-arg]
        """The server's record of the current conversation (through the HTTP API)."""
        conversation = conversation or self.current_conversation()
        response = httpx.get(
            f"{self.server.url}/api/conversations/{conversation}",
            headers={"Cookie": self.cookie_header()},
            timeout=10,
        )
        response.raise_for_status()
        messages: list[dict] = response.json()["messages"]  # type: ignore[type-arg]
        return messages

    def current_conversation(self) -> str:
        value = self.page.evaluate("localStorage.getItem('tokenwire.conversation')")
        assert isinstance(value, str)
        return value


def shown_text(answer: str) -> str:
    """What the page shows of a raw answer: the text of its rendered markdown, exactly as
    the DOM's textContent has it (markers like ** and ``` are not shown)."""
    from frontend.tokenwire.core.markdown import MarkdownStream, plain_text

    stream = MarkdownStream()
    return plain_text(stream.feed(answer) + stream.finish())
