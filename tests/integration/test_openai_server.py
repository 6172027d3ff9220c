"""tokenwire with the OpenAI-compatible provider, end to end: a real tokenwire server whose
provider talks to a real fake-OpenAI HTTP server, and a real WebSocket client."""

from __future__ import annotations

from typing import Any

from harness.server import Client, start_chat
from tests.support.fake_openai import API_KEY, FakeOpenAI


def openai_server(make_server: Any, upstream: FakeOpenAI, model: str) -> Any:
    return make_server(
        provider="openai",
        openai_base_url=upstream.base_url,
        openai_api_key=API_KEY,
        openai_model=model,
        provider_timeout=5,
    )


async def test_streams_the_providers_tokens(make_server: Any, upstream: FakeOpenAI) -> None:
    server = openai_server(make_server, upstream, "normal")
    client = await Client.connect(server)
    stream, conversation = await start_chat(client, "Hi there")
    view = await client.until_end(stream)
    assert view.text == "Hello wor\u2028ld"
    assert view.end == {"type": "done", "id": stream, "seq": 3, "reason": "stop"}
    request = upstream.requests[-1]
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.body["stream"] is True
    assert request.body["messages"][-1] == {"role": "user", "content": "Hi there"}

    # The next message of the conversation carries the history as context.
    second, _ = await start_chat(client, "And again", conversation=conversation)
    await client.until_end(second)
    assert [m["content"] for m in upstream.requests[-1].body["messages"]] == [
        "Hi there",
        "Hello wor\u2028ld",
        "And again",
    ]


async def test_mid_stream_failure_is_a_provider_error(
    make_server: Any, upstream: FakeOpenAI
) -> None:
    server = openai_server(make_server, upstream, "abort")
    client = await Client.connect(server)
    stream, _ = await start_chat(client, "Hi")
    view = await client.until_end(stream)
    assert view.end is not None
    assert (view.end["type"], view.end["code"], view.end["retryable"]) == (
        "error",
        "provider_error",
        True,
    )
    assert API_KEY not in view.end["message"]
    assert view.text == "Hello wor\u2028ld"  # what arrived before the failure stays shown
    # The connection is alive and usable.
    await client.send(type="ping", t=7)
    assert await client.until(lambda f: f["type"] == "pong") == {"type": "pong", "t": 7}


async def test_upstream_refusal_is_a_provider_error(make_server: Any, upstream: FakeOpenAI) -> None:
    server = openai_server(make_server, upstream, "unauthorized")
    client = await Client.connect(server)
    stream, _ = await start_chat(client, "Hi")
    view = await client.until_end(stream)
    assert view.end is not None and view.end["code"] == "provider_error"
    assert API_KEY not in view.end["message"]
    assert view.text == ""
