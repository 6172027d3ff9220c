"""Tokens joined end to end: a generation appends and announces the tokens its provider
hands over together as one event, frames carry `n` tokens, and what a client finally sees
is still the provider's text exactly once. The counters at /metrics add up."""

from __future__ import annotations

from collections.abc import Callable

from backend.providers import demo_reply, demo_tokens
from harness.server import Client, Server, StreamView, start_chat
from tests.support.sse_client import fold, sse_stream

PARAGRAPHS = 20  # about 1,300 tokens: unpaced, the demo model hands them over 64 at a time


def unpaced(make_server: Callable[..., Server]) -> Server:
    return make_server(
        demo_tokens_per_second="0", demo_first_token_delay="0", demo_paragraphs=str(PARAGRAPHS)
    )


async def test_joined_tokens_reach_every_connection_exactly_once(
    make_server: Callable[..., Server],
) -> None:
    server = unpaced(make_server)
    sender = await Client.connect(server)
    other = await Client.connect(server, cookie=sender.cookie)  # the same user
    try:
        stream, _ = await start_chat(sender, "join us")
        seen = [await sender.until_end(stream), await other.until_end(stream)]
    finally:
        await sender.close()
        await other.close()
    tokens = demo_tokens("join us", PARAGRAPHS)
    for view in seen:
        assert view.text == demo_reply("join us", PARAGRAPHS)
        assert (view.duplicates, view.gaps) == (0, 0)
        assert view.last == len(tokens)
        assert view.end is not None and view.end["seq"] == len(tokens)
        assert view.max_n > 1  # frames carried several tokens
    metrics = server.metrics()
    assert metrics["tokenwire_tokens_generated_total"] == len(tokens)
    assert metrics["tokenwire_tokens_sent_total"] == 2 * len(tokens)
    assert metrics["tokenwire_token_frames_sent_total"] == sum(view.frames for view in seen)
    assert metrics["tokenwire_first_token_seconds_count"] == 1
    assert metrics["tokenwire_provider_errors_total"] == 0


async def test_joined_tokens_resume_exactly_from_the_middle_of_an_event(
    make_server: Callable[..., Server],
) -> None:
    """A resume after a seq inside what was one event: the rest comes from the log, cut at
    that token, on WebSocket and on SSE."""
    server = unpaced(make_server)
    client = await Client.connect(server)
    try:
        stream, _ = await start_chat(client, "cut me")
        await client.until_end(stream)
        tokens = demo_tokens("cut me", PARAGRAPHS)
        after = 100  # no event boundary needs to be here
        later = await Client.connect(server, cookie=client.cookie)
        try:
            view = later.view(stream)
            view.text, view.last = "".join(tokens[:after]), after
            await later.resume(stream, view)
            await later.until_end(stream)
        finally:
            await later.close()
        async with sse_stream(server, stream, cookie=client.cookie, after=after) as sse:
            events = await sse.read_to_end()
    finally:
        await client.close()
    assert view.text == "".join(tokens)
    assert (view.duplicates, view.gaps) == (0, 0)
    sse_view = fold(events, StreamView(last=after))
    assert sse_view.text == "".join(tokens[after:])
    assert (sse_view.duplicates, sse_view.gaps) == (0, 0)


async def test_provider_errors_are_counted(make_server: Callable[..., Server]) -> None:
    server = unpaced(make_server)
    client = await Client.connect(server)
    try:
        stream, _ = await start_chat(client, "/fail please")
        view = await client.until_end(stream)
    finally:
        await client.close()
    assert view.end is not None and view.end["code"] == "provider_error"
    assert view.text == "".join(demo_tokens("/fail please", PARAGRAPHS)[:5])
    metrics = server.metrics()
    assert metrics["tokenwire_provider_errors_total"] == 1
    assert metrics["tokenwire_tokens_generated_total"] == 5
