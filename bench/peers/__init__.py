"""The peers tokenwire is measured against, each a runnable module with `--port`:
`bare_ws` (the ceiling: a bare `websockets` server) and `socketio_app` (what a user would
build instead: python-socketio on uvicorn). Both stream tokenwire's own demo (or clock)
provider, so every peer sends the same tokens at the same pace (`answer`)."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

from backend.protocol import ChatTurn
from backend.providers import ClockProvider, DemoProvider, Finish


def peer_arguments(description: str | None) -> argparse.Namespace:
    """The command line every peer takes: the same knobs as TOKENWIRE_DEMO_* and
    TOKENWIRE_PROVIDER, so a peer and tokenwire are configured alike."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--provider", choices=("demo", "clock"), default="demo")
    parser.add_argument("--tokens-per-second", type=float, default=50.0)
    parser.add_argument("--first-token-delay", type=float, default=0.0)
    parser.add_argument("--paragraphs", type=int, default=3)
    return parser.parse_args()


def make_provider(args: argparse.Namespace) -> DemoProvider:
    kind = ClockProvider if args.provider == "clock" else DemoProvider
    return kind(
        first_token_delay=args.first_token_delay,
        tokens_per_second=args.tokens_per_second,
        paragraphs=args.paragraphs,
    )


async def answer(provider: DemoProvider, text: str) -> AsyncIterator[str]:
    """The provider's tokens for the prompt `text`, at the provider's pace (the very code
    tokenwire runs, so pacing costs every peer the same)."""
    async for item in provider.stream([ChatTurn(role="user", content=text)]):
        if isinstance(item, Finish):
            return
        yield item
