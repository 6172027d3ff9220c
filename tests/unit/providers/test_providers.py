"""Providers: the demo model's text and pacing, and the OpenAI-compatible client against a
real HTTP server (raw ASGI under uvicorn) that speaks the streaming chat-completions format."""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any

import httpx
import pytest

from backend.protocol import ChatTurn
from backend.providers import (
    DEFAULT_PARAGRAPHS,
    ClockProvider,
    DemoProvider,
    Finish,
    OpenAIProvider,
    Provider,
    ProviderError,
    demo_reply,
    demo_tokens,
)
from backend.providers.demo import MAX_PARAGRAPHS
from backend.providers.openai import SSEParser
from backend.runtime import make_provider
from backend.settings import Settings
from harness.server import Client, Server, start_chat
from tests.support.fake_openai import API_KEY, FakeOpenAI

TIMEOUT = 10.0

PROMPTS = [
    "",
    "hello",
    "Hello",
    "How do I stream tokens to a browser?",
    "/fail please",
    "émoji 🎉 and ünïcode \u2028 line separator",
    "<script>alert('x')</script>" * 10,
    "```python\nprint('hi')\n```",
    "\n\n\n",
    "   spaces   ",
    "x" * 10_000,
]


async def collect(
    stream: AsyncIterator[str | Finish], into: list[str | Finish] | None = None
) -> list[str | Finish]:
    """Everything `stream` yields; `into` keeps what arrived before an exception."""
    items = into if into is not None else []
    async with asyncio.timeout(TIMEOUT):
        async for item in stream:
            items.append(item)
    return items


def user(text: str) -> list[ChatTurn]:
    return [ChatTurn(role="user", content=text)]


# ---- demo_reply / demo_tokens --------------------------------------------------------------


def test_demo_reply_is_deterministic_per_prompt() -> None:
    assert demo_reply("hello") == demo_reply("hello")
    assert demo_tokens("hello") == demo_tokens("hello")
    replies = {demo_reply(p) for p in PROMPTS}
    assert len(replies) == len(PROMPTS)


@pytest.mark.parametrize("paragraphs", [0, 1, 2, 3, 7, 50], ids=lambda n: f"paragraphs={n}")
def test_demo_tokens_join_to_the_reply(paragraphs: int) -> None:
    for prompt in PROMPTS:
        tokens = demo_tokens(prompt, paragraphs)
        assert "".join(tokens) == demo_reply(prompt, paragraphs)
        assert all(tokens)


def test_demo_tokens_join_to_a_load_test_sized_reply() -> None:
    tokens = demo_tokens("load test", 3000)
    reply = demo_reply("load test", 3000)
    assert "".join(tokens) == reply
    assert all(tokens)
    assert len(reply.split("\n\n")) == 3001


@pytest.mark.parametrize("paragraphs", [0, 1, 2, 3, 40], ids=lambda n: f"paragraphs={n}")
def test_demo_reply_shape(paragraphs: int) -> None:
    for prompt in PROMPTS:
        reply = demo_reply(prompt, paragraphs)
        blocks = reply.split("\n\n")
        assert len(blocks) == paragraphs + 1
        assert all(ch == "\n" or " " <= ch <= "~" for ch in reply)
        assert "\n" not in blocks[0]
        for block in blocks[1:]:
            words = len(block.split())
            assert 30 <= words <= 100, block


@pytest.mark.parametrize("paragraphs", [1, 2, 3, 40], ids=lambda n: f"paragraphs={n}")
def test_demo_reply_has_markdown(paragraphs: int) -> None:
    reply = demo_reply("markdown please", paragraphs)
    assert re.search(r"^- \S", reply, re.MULTILINE)
    assert re.search(r"`[^`\n]+`", reply)
    assert re.search(r"\*\*[^*\n]+\*\*", reply)
    fences = reply.count("```")
    if paragraphs >= 2:
        assert fences == 2
        assert reply.count("```python\n") == 1
    else:
        assert fences == 0


def test_demo_reply_echoes_only_a_sanitized_head_of_the_prompt() -> None:
    reply = demo_reply("<b>Why</b> is the sky blue? " + "tail-marker " * 20)
    first_line = reply.split("\n", 1)[0]
    assert "bWhyb is the sky blue" in first_line
    assert "<" not in reply
    assert "tail-marker tail-marker" not in reply


def test_demo_tokens_split_some_words_mid_word() -> None:
    tokens = demo_tokens("split words please")
    splits = [(a, b) for a, b in itertools.pairwise(tokens) if a[-1].isalpha() and b[0].isalpha()]
    assert splits
    assert sum(token.startswith(" ") for token in tokens) > len(tokens) / 2


def test_demo_reply_rejects_bad_paragraph_counts() -> None:
    with pytest.raises(ValueError, match="paragraphs"):
        demo_reply("x", -1)


# ---- DemoProvider ----------------------------------------------------------------------------


async def test_demo_provider_yields_the_tokens_then_stop() -> None:
    provider = DemoProvider(first_token_delay=0, tokens_per_second=0)
    turns = [
        ChatTurn(role="system", content="be brief"),
        ChatTurn(role="user", content="first question"),
        ChatTurn(role="assistant", content="first answer"),
        ChatTurn(role="user", content="second question"),
    ]
    items = await collect(provider.stream(turns))
    assert items == [*demo_tokens("second question"), Finish("stop")]
    await provider.aclose()


async def test_demo_provider_unpaced_large_answer() -> None:
    provider = DemoProvider(first_token_delay=0, tokens_per_second=0, paragraphs=300)
    items = await collect(provider.stream(user("load")))
    assert items == [*demo_tokens("load", 300), Finish("stop")]


async def test_demo_provider_paces_tokens() -> None:
    provider = DemoProvider(first_token_delay=0, tokens_per_second=200)
    stream = provider.stream(user("pace me"))
    assert isinstance(stream, AsyncGenerator)
    loop = asyncio.get_running_loop()
    start = loop.time()
    tokens: list[str | Finish] = []
    async with asyncio.timeout(TIMEOUT), aclosing(stream):
        async for item in stream:
            tokens.append(item)
            if len(tokens) == 20:
                break
    # 20 tokens at 200/s: the 20th is due 19 intervals (0.095 s) after the first.
    # Only a lower bound: a slow machine may take longer, never shorter.
    assert loop.time() - start >= 0.09
    assert tokens == demo_tokens("pace me")[:20]


async def test_demo_provider_first_token_delay() -> None:
    provider = DemoProvider(first_token_delay=0.05, tokens_per_second=0, paragraphs=0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    items = await collect(provider.stream(user("hi")))
    assert loop.time() - start >= 0.045
    assert items[-1] == Finish("stop")


async def test_demo_provider_fail_prompt() -> None:
    provider = DemoProvider(first_token_delay=0, tokens_per_second=0)
    items: list[str | Finish] = []
    with pytest.raises(ProviderError, match=r"on purpose \(prompt starts with /fail\)"):
        await collect(provider.stream(user("/fail now")), items)
    assert items == demo_tokens("/fail now")[:5]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"first_token_delay": -1.0}, "first_token_delay"),
        ({"first_token_delay": float("nan")}, "first_token_delay"),
        ({"first_token_delay": float("inf")}, "first_token_delay"),
        ({"tokens_per_second": float("nan")}, "tokens_per_second"),
        ({"tokens_per_second": float("inf")}, "tokens_per_second"),
        ({"paragraphs": -1}, "paragraphs"),
        ({"paragraphs": MAX_PARAGRAPHS + 1}, "paragraphs"),
    ],
    ids=[
        "negative-delay",
        "nan-delay",
        "inf-delay",
        "nan-rate",
        "inf-rate",
        "negative-paragraphs",
        "too-many-paragraphs",
    ],
)
def test_demo_provider_validates_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DemoProvider(**kwargs)


def test_demo_provider_defaults() -> None:
    provider = DemoProvider()
    assert provider.name == "demo"
    assert provider.paragraphs == DEFAULT_PARAGRAPHS


# ---- ClockProvider ---------------------------------------------------------------------------

CLOCK_TOKEN = re.compile(r"^[1-9][0-9]{15} $")


def clock_times(items: list[str | Finish]) -> list[int]:
    """The production times (µs since the epoch) of the clock tokens in `items`."""
    tokens = [item for item in items if isinstance(item, str)]
    assert all(CLOCK_TOKEN.match(token) for token in tokens), tokens[:3]
    return [int(token) for token in tokens]


@pytest.mark.parametrize("paragraphs", [0, 1, 3], ids=lambda n: f"paragraphs={n}")
async def test_clock_provider_yields_production_times(paragraphs: int) -> None:
    provider = ClockProvider(first_token_delay=0, tokens_per_second=0, paragraphs=paragraphs)
    before = time.time_ns() // 1000
    items = await collect(provider.stream(user("what time is it")))
    after = time.time_ns() // 1000
    assert items[-1] == Finish("stop")
    times = clock_times(items[:-1])
    # As many tokens as the demo model's answer to the same prompt, in production order.
    assert len(times) == len(demo_tokens("what time is it", paragraphs))
    assert times == sorted(times)
    assert before <= times[0] and times[-1] <= after


async def test_clock_provider_reads_the_clock_when_each_token_is_due() -> None:
    provider = ClockProvider(first_token_delay=0.05, tokens_per_second=100, paragraphs=0)
    start = time.time_ns() // 1000
    items = await collect(provider.stream(user("pace")))
    times = clock_times(items[:-1])
    # Token i is due 50 ms + i * 10 ms after the start: its time is never earlier than that
    # (a slow machine may make it later), so the clock is read after the wait, not before.
    assert len(times) >= 2
    for index, produced in enumerate(times):
        assert produced - start >= 50_000 + index * 10_000 - 1_000


async def test_clock_provider_ignores_fail_prompts() -> None:
    # `/fail` is the demo model's test hook; the clock model measures, it never fails.
    provider = ClockProvider(first_token_delay=0, tokens_per_second=0, paragraphs=0)
    items = await collect(provider.stream(user("/fail")))
    assert items[-1] == Finish("stop")
    assert len(clock_times(items[:-1])) == len(demo_tokens("/fail", 0))


@pytest.mark.parametrize(
    ("provider", "kind"),
    [("demo", DemoProvider), ("clock", ClockProvider), ("openai", OpenAIProvider)],
    ids=["demo", "clock", "openai"],
)
def test_make_provider_chooses_by_setting(provider: str, kind: type) -> None:
    settings = Settings.from_env(
        {
            "TOKENWIRE_PROVIDER": provider,
            "TOKENWIRE_DEMO_TOKENS_PER_SECOND": "123",
            "TOKENWIRE_DEMO_PARAGRAPHS": "4",
        }
    )
    made = make_provider(settings)
    assert type(made) is kind
    assert made.name == provider
    if isinstance(made, DemoProvider):
        assert (made.tokens_per_second, made.paragraphs) == (123.0, 4)


async def test_clock_provider_through_the_server(make_server: Callable[..., Server]) -> None:
    server = make_server(
        provider="clock",
        demo_first_token_delay="0",
        demo_tokens_per_second="500",
        demo_paragraphs="1",
    )
    client = await Client.connect(server)
    try:
        stream, _ = await start_chat(client, "clock")
        view = await client.until_end(stream)
        received = time.time_ns() // 1000
    finally:
        await client.close()
    assert view.end is not None and view.end["reason"] == "stop"
    assert (view.duplicates, view.gaps) == (0, 0)
    times = [int(word) for word in view.text.split(" ") if word]
    assert view.text == "".join(f"{t} " for t in times)
    assert len(times) == len(demo_tokens("clock", 1))
    assert times == sorted(times) and times[-1] <= received


# ---- batches: tokens handed over together --------------------------------------------------


async def collect_batches(
    stream: AsyncIterator[list[str] | Finish], pause: float = 0.0
) -> list[list[str] | Finish]:
    """Every batch; `pause` seconds of (blocking) work after each, like a busy node."""
    items: list[list[str] | Finish] = []
    async with asyncio.timeout(TIMEOUT):
        async for item in stream:
            items.append(item)
            if pause:
                time.sleep(pause)  # noqa: ASYNC251 (blocking on purpose: a busy loop)
    return items


def tokens_of(items: list[list[str] | Finish]) -> list[str]:
    return [token for item in items if not isinstance(item, Finish) for token in item]


async def test_demo_batches_are_the_tokens_grouped() -> None:
    provider = DemoProvider(first_token_delay=0, tokens_per_second=0, paragraphs=20)
    items = await collect_batches(provider.batches(user("batch me")))
    assert items[-1] == Finish("stop")
    assert tokens_of(items) == demo_tokens("batch me", 20)
    batches = [item for item in items if not isinstance(item, Finish)]
    # Unpaced: everything is due at once, handed over in runs of at most 64.
    assert all(1 <= len(batch) <= 64 for batch in batches)
    assert max(len(batch) for batch in batches) == 64


async def test_a_paced_provider_hands_over_overdue_tokens_together() -> None:
    provider = DemoProvider(first_token_delay=0, tokens_per_second=1000, paragraphs=1)
    # Each batch is followed by 10 ms of blocking work: about 10 tokens fall due meanwhile.
    items = await collect_batches(provider.batches(user("slow consumer")), pause=0.01)
    assert tokens_of(items) == demo_tokens("slow consumer", 1)
    sizes = [len(item) for item in items if not isinstance(item, Finish)]
    assert max(sizes) >= 5, sizes


async def test_a_paced_provider_that_keeps_up_hands_over_one_token_at_a_time() -> None:
    provider = DemoProvider(first_token_delay=0, tokens_per_second=100, paragraphs=0)
    items = await collect_batches(provider.batches(user("keeping up")))
    sizes = [len(item) for item in items if not isinstance(item, Finish)]
    # 10 ms between tokens and a consumer that does nothing: one token per batch, with
    # the odd pair when this machine's event loop was late.
    assert sum(sizes) == len(demo_tokens("keeping up", 0))
    assert sizes.count(1) >= len(sizes) // 2, sizes


async def test_demo_batches_fail_like_the_stream() -> None:
    provider = DemoProvider(first_token_delay=0, tokens_per_second=0)
    items: list[list[str] | Finish] = []
    with pytest.raises(ProviderError, match="on purpose"):
        async with asyncio.timeout(TIMEOUT):
            async for item in provider.batches(user("/fail batch")):
                items.append(item)
    assert tokens_of(items) == demo_tokens("/fail batch")[:5]


async def test_clock_batches_carry_one_production_time_per_batch() -> None:
    provider = ClockProvider(first_token_delay=0, tokens_per_second=1000, paragraphs=1)
    items = await collect_batches(provider.batches(user("clock batch")), pause=0.01)
    assert items[-1] == Finish("stop")
    batches = [item for item in items if not isinstance(item, Finish)]
    assert sum(map(len, batches)) == len(demo_tokens("clock batch", 1))
    for batch in batches:
        assert len(set(batch)) == 1  # produced together
    assert clock_times(tokens_of(items)) == sorted(clock_times(tokens_of(items)))
    assert max(map(len, batches)) >= 5


async def test_default_batches_are_one_token_each() -> None:
    class Plain(Provider):
        name = "plain"

        async def stream(self, turns: Sequence[ChatTurn]) -> AsyncIterator[str | Finish]:
            for token in ("a", "b", "c"):
                yield token
            yield Finish("length")

    items = await collect_batches(Plain().batches(user("x")))
    assert items == [["a"], ["b"], ["c"], Finish("length")]


# ---- SSEParser -------------------------------------------------------------------------------

SSE_CASES = [
    (b"data: a\n\n", [b"a"]),
    (b"data:a\n\n", [b"a"]),
    (b"data:  a\n\n", [b" a"]),
    (b"data: a\r\n\r\ndata: b\r\rdata: c\n\n", [b"a", b"b", b"c"]),
    (b"data: a\r\ndata: b\r\n\r\n", [b"a\nb"]),
    (b": keep-alive\n\nevent: x\nid: 1\nretry: 5\ndata: a\n\n", [b"a"]),
    (b"\n\n\ndata: a\n\n", [b"a"]),
    (b"data: a\n\ndata: incomplete\n", [b"a"]),
    (b'data: {"x": "\xe2\x80\xa8\xc2\x85"}\n\n', [b'{"x": "\xe2\x80\xa8\xc2\x85"}']),
    (b"data\n\n", [b""]),
]


@pytest.mark.parametrize(("body", "events"), SSE_CASES)
@pytest.mark.parametrize("chunking", ["whole", "bytewise"])
def test_sse_parser(body: bytes, events: list[bytes], chunking: str) -> None:
    parser = SSEParser()
    if chunking == "whole":
        got = parser.feed(body)
    else:
        got = [event for i in range(len(body)) for event in parser.feed(body[i : i + 1])]
    assert got == events


def test_sse_parser_bounds_event_size() -> None:
    parser = SSEParser(max_event_bytes=100)
    parser.feed(b"data: " + b"x" * 50)
    with pytest.raises(ProviderError, match="larger than 100 bytes"):
        parser.feed(b"x" * 60)


# ---- OpenAIProvider against a real server ----------------------------------------------------

TURNS = [ChatTurn(role="system", content="be brief"), ChatTurn(role="user", content="Hi")]
HELLO_TOKENS = ["Hel", "lo", " wor\u2028ld"]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        pytest.param("normal", [*HELLO_TOKENS, Finish("stop")], id="normal"),
        pytest.param("normal-crlf", [*HELLO_TOKENS, Finish("stop")], id="crlf"),
        pytest.param("normal-split", [*HELLO_TOKENS, Finish("stop")], id="split-writes"),
        pytest.param("length", [*HELLO_TOKENS, Finish("length")], id="length"),
        pytest.param("no-done", [*HELLO_TOKENS, Finish("stop")], id="finish-without-done"),
    ],
)
async def test_openai_streams_tokens(
    upstream: FakeOpenAI, model: str, expected: list[str | Finish]
) -> None:
    provider = OpenAIProvider(base_url=upstream.base_url + "/", api_key=API_KEY, model=model)
    try:
        assert await collect(provider.stream(TURNS)) == expected
    finally:
        await provider.aclose()
    (request,) = upstream.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.body == {
        "model": model,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "Hi"},
        ],
        "stream": True,
    }


async def test_openai_without_api_key_sends_no_authorization(upstream: FakeOpenAI) -> None:
    provider = OpenAIProvider(base_url=upstream.base_url, api_key=None, model="normal")
    try:
        await collect(provider.stream(TURNS))
    finally:
        await provider.aclose()
    assert "authorization" not in upstream.requests[0].headers


@pytest.mark.parametrize(
    ("model", "message", "tokens_before"),
    [
        pytest.param("cut", "provider stream ended early", HELLO_TOKENS, id="cut"),
        pytest.param(
            "abort", "provider stream ended early (connection lost)", HELLO_TOKENS, id="abort"
        ),
        pytest.param(
            "unauthorized",
            "provider returned HTTP 401: Incorrect API key provided: Bearer ***",
            [],
            id="http-401",
        ),
        pytest.param(
            "long-error",
            "provider returned HTTP 400: " + "y" * 197 + "...",
            [],
            id="long-upstream-message",
        ),
        pytest.param("html-error", "provider returned HTTP 502", [], id="non-json-error"),
        pytest.param(
            "malformed", "provider sent a malformed stream chunk", HELLO_TOKENS[:1], id="bad-json"
        ),
        pytest.param(
            "chunk-error",
            "provider reported an error: model overloaded",
            HELLO_TOKENS[:1],
            id="error-in-chunk",
        ),
    ],
)
async def test_openai_failures(
    upstream: FakeOpenAI, model: str, message: str, tokens_before: list[str]
) -> None:
    provider = OpenAIProvider(base_url=upstream.base_url, api_key=API_KEY, model=model)
    items: list[str | Finish] = []
    try:
        with pytest.raises(ProviderError) as caught:
            await collect(provider.stream(TURNS), items)
    finally:
        await provider.aclose()
    assert str(caught.value) == message
    assert items == tokens_before


async def test_openai_connection_refused() -> None:
    # A bound socket that never listens: connecting to it is refused, and no other test or
    # process can take the port meanwhile.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        provider = OpenAIProvider(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, model="normal"
        )
        try:
            with pytest.raises(ProviderError, match="could not connect to the provider"):
                await collect(provider.stream(TURNS))
        finally:
            await provider.aclose()


async def test_openai_read_timeout(upstream: FakeOpenAI) -> None:
    provider = OpenAIProvider(base_url=upstream.base_url, api_key=None, model="stall", timeout=0.2)
    items: list[str | Finish] = []
    try:
        with pytest.raises(ProviderError, match="provider timed out"):
            await collect(provider.stream(TURNS), items)
    finally:
        await provider.aclose()
    assert items == HELLO_TOKENS[:1]
    async with asyncio.timeout(TIMEOUT):
        await upstream.disconnected.wait()


async def test_openai_cancellation_propagates_and_closes_the_response(
    upstream: FakeOpenAI,
) -> None:
    provider = OpenAIProvider(base_url=upstream.base_url, api_key=None, model="stall")
    first = asyncio.Event()
    items: list[str | Finish] = []

    async def consume() -> None:
        async for item in provider.stream(TURNS):
            items.append(item)
            first.set()

    task = asyncio.create_task(consume())
    try:
        async with asyncio.timeout(TIMEOUT):
            await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(TIMEOUT):
                await task
        # The upstream sees the connection go away: the response was closed, not leaked.
        async with asyncio.timeout(TIMEOUT):
            await upstream.disconnected.wait()
    finally:
        await provider.aclose()
    assert items == HELLO_TOKENS[:1]


async def test_openai_does_not_close_a_client_it_was_given(upstream: FakeOpenAI) -> None:
    async with httpx.AsyncClient() as client:
        provider = OpenAIProvider(
            base_url=upstream.base_url, api_key=None, model="normal", client=client
        )
        assert await collect(provider.stream(TURNS)) == [*HELLO_TOKENS, Finish("stop")]
        await provider.aclose()
        assert not client.is_closed
        assert await collect(provider.stream(TURNS)) == [*HELLO_TOKENS, Finish("stop")]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_url": "localhost:8000/v1"}, "must start with http:// or https://"),
        ({"model": ""}, "model name must not be empty"),
        ({"timeout": 0.0}, "timeout must be a positive number"),
        ({"timeout": float("nan")}, "timeout must be a positive number"),
    ],
    ids=["no-scheme", "empty-model", "zero-timeout", "nan-timeout"],
)
def test_openai_validates_arguments(kwargs: dict[str, Any], match: str) -> None:
    arguments: dict[str, Any] = {
        "base_url": "http://127.0.0.1:1/v1",
        "api_key": None,
        "model": "m",
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        OpenAIProvider(**arguments)


@pytest.mark.parametrize("model", ["normal", "normal-split", "no-done"])
async def test_openai_batches_hold_the_same_tokens(upstream: FakeOpenAI, model: str) -> None:
    provider = OpenAIProvider(base_url=upstream.base_url, api_key=None, model=model)
    try:
        items = await collect_batches(provider.batches(TURNS))
    finally:
        await provider.aclose()
    assert items[-1] == Finish("stop")
    assert tokens_of(items) == HELLO_TOKENS
    assert all(item for item in items[:-1])  # no empty batch


async def test_openai_batches_keep_the_tokens_before_a_bad_chunk(upstream: FakeOpenAI) -> None:
    provider = OpenAIProvider(base_url=upstream.base_url, api_key=None, model="malformed")
    items: list[list[str] | Finish] = []
    try:
        with pytest.raises(ProviderError, match="malformed stream chunk"):
            async with asyncio.timeout(TIMEOUT):
                async for item in provider.batches(TURNS):
                    items.append(item)
    finally:
        await provider.aclose()
    assert tokens_of(items) == HELLO_TOKENS[:1]
