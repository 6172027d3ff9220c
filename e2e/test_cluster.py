"""Scenario 5 with Redis: two nodes behind a balancer, and one of them killed mid-stream.

- The killed node only held the browser's connection (the answer is generated on the
  other node, started there through the HTTP API with the page's identity and shown live
  in the page): the page lands on the surviving node and the answer completes exactly once.
- The killed node was generating: the page shows the answer incomplete within a bounded
  time (the generation's lease lapses), and Retry completes it on the surviving node.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from backend.providers import demo_reply
from e2e.chat_page import ChatPage, shown_text
from e2e.conftest import E2E_DEMO
from harness.redis_server import start_redis
from harness.server import Server, start_server
from tests.support.balancer import Balancer

CLUSTER = {**E2E_DEMO, "heartbeat": 1, "heartbeat_timeout": 1, "lease_seconds": 1}


class ThreadedBalancer:
    """The async test balancer on a loop of its own, for Playwright's sync tests."""

    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.balancer = Balancer(backends)
        self._run(self.balancer.start())

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.balancer.port}"

    def only(self, node: Server) -> None:
        """New connections go to `node` alone (existing ones stay where they are)."""
        for backend in self.balancer.backends:
            self.loop.call_soon_threadsafe(self.balancer.remove, backend)
        self.loop.call_soon_threadsafe(self.balancer.add, ("127.0.0.1", node.port))

    def add(self, node: Server) -> None:
        self.loop.call_soon_threadsafe(self.balancer.add, ("127.0.0.1", node.port))

    def close(self) -> None:
        self._run(self.balancer.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Server, Server, ThreadedBalancer]]:
    redis = start_redis(tmp_path)
    nodes = [
        start_server(tmp_path, redis_url=redis.url, node=name, **CLUSTER)
        for name in ("node-a", "node-b")
    ]
    balancer = ThreadedBalancer([("127.0.0.1", n.port) for n in nodes])
    yield nodes[0], nodes[1], balancer
    balancer.close()
    for node in nodes:
        node.stop(signal.SIGKILL)
    redis.stop()


def node_of_page(page: Page) -> str:
    """The node the page's WebSocket landed on (the app records hello.node)."""
    return str(page.locator("#app").get_attribute("data-node") or "")


def test_killed_node_held_only_the_connection(
    page: Page, cluster: tuple[Server, Server, ThreadedBalancer]
) -> None:
    node_a, node_b, balancer = cluster
    balancer.only(node_a)
    chat = ChatPage(page, node_b, origin=balancer.url).open()
    expect(page.locator("#app")).to_have_attribute("data-node", "node-a")
    balancer.add(node_b)
    # Another tab of the same user starts an answer on node B: the page shows it live.
    conversation = chat.current_conversation()
    request = uuid.uuid4().hex
    response = httpx.post(
        f"{node_b.url}/api/chat",
        json={"id": request, "conversation": conversation, "text": "Generated on B"},
        headers={"Cookie": chat.cookie_header()},
        timeout=10,
    )
    assert response.status_code == 202
    chat.wait_tokens(40)
    node_a.stop(signal.SIGKILL)
    text = chat.wait_answer_status("done")
    assert text == shown_text(demo_reply("Generated on B"))
    expect(page.locator(".msg.assistant")).to_have_count(1)
    assert node_of_page(page) == "node-b"
    assert [(m["role"], m["complete"]) for m in chat.history()] == [
        ("user", True),
        ("assistant", True),
    ]


def test_killed_node_was_generating_and_retry_completes_elsewhere(
    page: Page, cluster: tuple[Server, Server, ThreadedBalancer]
) -> None:
    node_a, node_b, balancer = cluster
    balancer.only(node_a)
    chat = ChatPage(page, node_b, origin=balancer.url).open()
    expect(page.locator("#app")).to_have_attribute("data-node", "node-a")
    chat.send("Generated on A")
    chat.wait_tokens(40)
    balancer.add(node_b)
    node_a.stop(signal.SIGKILL)
    # The lease (1 s) lapses; node B ends the stream for its readers; the page says so.
    chat.wait_answer_status("failed")
    retry = chat.assistant().locator("button.retry")
    expect(retry).to_be_visible()
    retry.click()
    assert chat.wait_answer_status("done") == shown_text(demo_reply("Generated on A"))
    expect(page.locator(".msg.assistant")).to_have_count(1)  # the retry replaced it
    assert node_of_page(page) == "node-b"
    history = chat.history()
    assert [(m["role"], m["complete"]) for m in history][-2:] == [
        ("user", True),
        ("assistant", True),
    ]
    assert history[-1]["text"] == demo_reply("Generated on A")
