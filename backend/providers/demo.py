"""The built-in offline demo model: deterministic, markdown-flavoured answers at a steady pace.

`demo_reply` and `demo_tokens` are pure functions of the prompt, so tests, load tests and the
browser demo all see the same text for the same prompt without any network or model.
`DemoProvider` only paces those tokens in time.

Special prompts exercise failure paths end to end:

- a prompt starting with ``/fail`` yields the first `FAIL_AFTER_TOKENS` tokens of its answer,
  then raises `ProviderError("demo model failed on purpose (prompt starts with /fail)")`.

Deliberate choices:

- The seed is a SHA-256 of the prompt, never `hash()`, which is salted per process and would
  give every server node a different answer for the same prompt.
- The first line quotes at most the first 40 characters of the prompt, reduced to ASCII
  letters, digits and spaces, so the demo never echoes markup or control characters back.
- Tokens are split like an LLM tokenizer (leading space kept with the word, some words cut in
  two) so the client's rendering of partial words and partial markdown gets exercised.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import random
import re
import string
from collections.abc import AsyncIterator, Sequence
from typing import Final

from backend.protocol import ChatTurn
from backend.providers.base import Finish, Provider, ProviderError

DEFAULT_PARAGRAPHS: Final = 3
# Large enough for load tests (3000 paragraphs: about 1 MB of text, 0.1 s of CPU), small enough
# that a typo in a configuration cannot stall the event loop or exhaust memory.
MAX_PARAGRAPHS: Final = 10_000
DEFAULT_FIRST_TOKEN_DELAY: Final = 0.3
DEFAULT_TOKENS_PER_SECOND: Final = 40.0
FAIL_PREFIX: Final = "/fail"
FAIL_AFTER_TOKENS: Final = 5
FAIL_MESSAGE: Final = "demo model failed on purpose (prompt starts with /fail)"

# How much of the prompt the first line may quote.
_ECHO_CHARS: Final = 40
# Without pacing, hand control back to the event loop this often so one fast stream cannot
# starve every other connection on the node.
_YIELD_EVERY: Final = 64
# Words of at least this many characters may be split in two, with this probability.
_SPLIT_MIN_CHARS: Final = 5
_SPLIT_PROBABILITY: Final = 0.25
_PARAGRAPH_WORDS: Final = (40, 70)  # target range; the last sentence may overshoot a little

_ECHO_ALLOWED: Final = frozenset(string.ascii_letters + string.digits + " ")

# A newline run, or optional spaces followed by a run of non-space characters, or trailing
# spaces: every character of any text matches exactly one of these, so joining the pieces
# gives back the text.
_PIECE: Final = re.compile(r"\n+| *[^ \n]+| +")

# Every noun and adjective starts with a consonant sound, so the templates' "a" always fits.
_NOUNS: Final = (
    "stream",
    "token",
    "buffer",
    "request",
    "response",
    "cursor",
    "connection",
    "queue",
    "worker",
    "client",
    "server",
    "sequence number",
    "heartbeat",
    "backlog",
    "reply",
    "timeout",
    "retry",
    "session",
)
_ADJECTIVES: Final = (
    "bounded",
    "boring",
    "predictable",
    "small",
    "well tested",
    "cancellable",
    "simple",
    "deterministic",
)
_CODE: Final = (
    "`seq`",
    "`asyncio.timeout()`",
    "`await`",
    "`async for`",
    "`Finish`",
    "`resume`",
    "`after`",
    "`done`",
    "`yield`",
    "`None`",
    "`retry_after`",
    "`aclose()`",
)
_PLAIN_SENTENCES: Final = (
    "A {n1} that is {adj} makes the {n2} much easier to reason about.",
    "Most problems with a {n1} come from the {n2}, not from the code around it.",
    "It helps to measure the {n1} before changing anything about the {n2}.",
    "In practice the {n1} and the {n2} fail together, so test them together.",
    "Keep the {n1} small and let the {n2} do the heavy lifting.",
    "If the {n1} is slow, every {n2} behind it will queue up and wait.",
    "The simplest fix is usually to make the {n1} {adj} and move on.",
    "Nothing about the {n1} needs to be clever for this to work well.",
    "A {adj} {n1} is worth more than a fast one that surprises people.",
    "When the {n2} restarts, the {n1} should pick up exactly where it left off.",
    "Think of the {n1} as a contract between the {n2} and everything else.",
    "You can usually spot the issue by logging the {n1} next to the {n2}.",
)
_CODE_SENTENCES: Final = (
    "Call {c} on the {n1} before you touch the {n2}.",
    "The {n1} exposes {c}, which is what the {n2} should rely on.",
    "Check {c} first, because it tells you whether the {n1} is still alive.",
    "Wrapping the {n1} in {c} keeps the {n2} from hanging forever.",
    "Pass {c} along with the {n1} so the {n2} knows what it already has.",
)
_BOLD_SENTENCES: Final = (
    "The {n1} must **never** block the {n2}.",
    "Every {n1} should be **bounded**, and that includes the {n2}.",
    "Remember that the {n1} is **the source of truth** for the {n2}.",
    "Delivery of each {n1} is **at most once** unless the {n2} resumes.",
    "The important part is that the {n1} stays **in order** for the {n2}.",
    "Make the {n1} **idempotent** so that a retried {n2} is harmless.",
)
_LIST_LEADS: Final = (
    "A few practical points:",
    "In short:",
    "Things worth checking:",
    "A checklist that tends to help:",
)
_LIST_ITEMS: Final = (
    "- Keep the {n1} {adj}.",
    "- Use {c} when the {n2} might stall.",
    "- Log the {n1}, not the raw {n2}.",
    "- Give every {n1} a timeout.",
    "- Test the {n1} against a real {n2}.",
    "- Prefer a {adj} {n1} over a clever one.",
    "- Decide who owns the {n1} and who only reads it.",
)
_CODE_LEADS: Final = (
    "Here is a minimal example in Python:",
    "A small sketch of the idea:",
    "In code, it looks roughly like this:",
)
# No blank lines inside snippets: blank lines separate paragraphs and nothing else.
_CODE_SNIPPETS: Final = (
    "async def relay(source, sink):\n"
    "    async for token in source:\n"
    "        await sink.send(token)\n"
    '    await sink.send("done")',
    "def resume_point(log, after):\n"
    "    # Everything the client has not seen yet.\n"
    "    return [entry for entry in log if entry.seq > after]",
    "async with asyncio.timeout(30):\n"
    "    reply = await provider.complete(prompt)\n"
    "print(reply.text)",
    "backoff = 0.5\n"
    "for attempt in range(5):\n"
    "    if await try_connect():\n"
    "        break\n"
    "    await asyncio.sleep(backoff)\n"
    "    backoff = min(backoff * 2, 10.0)",
)
_OPENINGS: Final = (
    'You asked about "{echo}". Here is how I would think about it.',
    'Good question about "{echo}". The short answer is below.',
    'Regarding "{echo}", there are a few things worth knowing.',
)
_OPENINGS_NO_ECHO: Final = (
    "Here is how I would think about it.",
    "Good question. The short answer is below.",
    "There are a few things worth knowing here.",
)


def _rng(prompt: str, purpose: str) -> random.Random:
    # surrogatepass: a prompt decoded from JSON may hold lone surrogates; it still needs a seed.
    digest = hashlib.sha256(purpose.encode() + b"\0" + prompt.encode("utf-8", "surrogatepass"))
    return random.Random(int.from_bytes(digest.digest()[:16], "big"))


def _check_paragraphs(paragraphs: int) -> None:
    if not 0 <= paragraphs <= MAX_PARAGRAPHS:
        raise ValueError(f"paragraphs must be between 0 and {MAX_PARAGRAPHS} (got {paragraphs!r})")


def _echo(prompt: str) -> str:
    head = "".join(
        ch if ch in _ECHO_ALLOWED else " " if ch.isspace() else "" for ch in prompt[:_ECHO_CHARS]
    )
    echo = " ".join(head.split())
    if echo and len(prompt) > _ECHO_CHARS:
        echo += "..."
    return echo


def _fill(rng: random.Random, template: str) -> str:
    n1, n2 = rng.sample(_NOUNS, 2)
    return template.format(n1=n1, n2=n2, adj=rng.choice(_ADJECTIVES), c=rng.choice(_CODE))


def _prose(rng: random.Random, min_words: int) -> str:
    # One sentence with inline code and one with bold in every paragraph, so any answer with
    # at least one paragraph shows both.
    sentences = [_fill(rng, rng.choice(_CODE_SENTENCES)), _fill(rng, rng.choice(_BOLD_SENTENCES))]
    words = sum(s.count(" ") + 1 for s in sentences)
    while words < min_words:
        pool = _PLAIN_SENTENCES if rng.random() < 0.7 else _CODE_SENTENCES + _BOLD_SENTENCES
        sentence = _fill(rng, rng.choice(pool))
        sentences.append(sentence)
        words += sentence.count(" ") + 1
    rng.shuffle(sentences)
    return " ".join(sentences)


def _bullets(rng: random.Random) -> str:
    items = rng.sample(_LIST_ITEMS, rng.randint(3, 5))
    return "\n".join([rng.choice(_LIST_LEADS), *(_fill(rng, item) for item in items)])


def _code_block(rng: random.Random) -> str:
    return f"{rng.choice(_CODE_LEADS)}\n```python\n{rng.choice(_CODE_SNIPPETS)}\n```"


def demo_reply(prompt: str, paragraphs: int = DEFAULT_PARAGRAPHS) -> str:
    """The demo model's answer to `prompt`: the same text for the same prompt, every time.

    A first line that mentions the prompt, then `paragraphs` paragraphs separated by blank
    lines. The first paragraph ends with a bulleted list, the second is a short lead-in and
    the only fenced code block, later ones are prose with an occasional list. Every paragraph
    has some `inline code` and **bold**. Printable ASCII and newlines only.
    """
    _check_paragraphs(paragraphs)
    rng = _rng(prompt, "reply")
    echo = _echo(prompt)
    blocks = [rng.choice(_OPENINGS).format(echo=echo) if echo else rng.choice(_OPENINGS_NO_ECHO)]
    low, high = _PARAGRAPH_WORDS
    for index in range(paragraphs):
        if index == 0:
            blocks.append(_prose(rng, low - 10) + "\n" + _bullets(rng))
        elif index == 1:
            blocks.append(_prose(rng, low - 20) + "\n" + _code_block(rng))
        elif rng.random() < 0.25:
            blocks.append(_prose(rng, low - 10) + "\n" + _bullets(rng))
        else:
            blocks.append(_prose(rng, rng.randint(low, high)))
    return "\n\n".join(blocks)


def demo_tokens(prompt: str, paragraphs: int = DEFAULT_PARAGRAPHS) -> list[str]:
    """`demo_reply(prompt, paragraphs)` cut into non-empty tokens the way LLM tokenizers do.

    Mostly one word with its leading space per token, newline runs as their own tokens, and
    about one in four longer words split in two (" stre" + "am"). Always
    `"".join(demo_tokens(p, n)) == demo_reply(p, n)`.
    """
    text = demo_reply(prompt, paragraphs)
    rng = _rng(prompt, "tokens")
    tokens: list[str] = []
    for piece in _PIECE.findall(text):
        word_start = len(piece) - len(piece.lstrip(" "))
        word_length = len(piece) - word_start
        if word_length >= _SPLIT_MIN_CHARS and rng.random() < _SPLIT_PROBABILITY:
            # Both halves keep at least two characters of the word.
            cut = word_start + rng.randint(2, word_length - 2)
            tokens.append(piece[:cut])
            tokens.append(piece[cut:])
        else:
            tokens.append(piece)
    return tokens


# Load tests send the same prompt thousands of times, and cutting a long answer costs
# milliseconds: keep the last few answers (bounded: at most `_CACHED_ANSWERS` of them).
_CACHED_ANSWERS: Final = 8


@functools.lru_cache(maxsize=_CACHED_ANSWERS)
def cached_demo_tokens(prompt: str, paragraphs: int) -> tuple[str, ...]:
    """`demo_tokens(prompt, paragraphs)`, computed once for repeated prompts."""
    return tuple(demo_tokens(prompt, paragraphs))


def _last_user_prompt(turns: Sequence[ChatTurn]) -> str:
    for turn in reversed(turns):
        if turn.role == "user":
            return turn.content
    return ""


class DemoProvider(Provider):
    """Streams `demo_tokens` of the last user message at `tokens_per_second`, then "stop".

    `tokens_per_second <= 0` disables pacing (load tests); `first_token_delay` imitates a
    model's time to first token.
    """

    name = "demo"

    def __init__(
        self,
        *,
        first_token_delay: float = DEFAULT_FIRST_TOKEN_DELAY,
        tokens_per_second: float = DEFAULT_TOKENS_PER_SECOND,
        paragraphs: int = DEFAULT_PARAGRAPHS,
    ) -> None:
        if not (math.isfinite(first_token_delay) and first_token_delay >= 0):
            raise ValueError(
                f"first_token_delay must be a finite number of seconds >= 0 "
                f"(got {first_token_delay!r})"
            )
        if not math.isfinite(tokens_per_second):
            raise ValueError(
                f"tokens_per_second must be a finite number; use 0 to disable pacing "
                f"(got {tokens_per_second!r})"
            )
        _check_paragraphs(paragraphs)
        self.first_token_delay = first_token_delay
        self.tokens_per_second = tokens_per_second
        self.paragraphs = paragraphs

    async def stream(self, turns: Sequence[ChatTurn]) -> AsyncIterator[str | Finish]:
        tokens, fail = self._answer(turns)
        async for due in self.paced(len(tokens)):
            for index in due:
                yield tokens[index]
        if fail:
            raise ProviderError(FAIL_MESSAGE)
        yield Finish("stop")

    async def batches(self, turns: Sequence[ChatTurn]) -> AsyncIterator[list[str] | Finish]:
        tokens, fail = self._answer(turns)
        async for due in self.paced(len(tokens)):
            yield list(tokens[due.start : due.stop])
        if fail:
            raise ProviderError(FAIL_MESSAGE)
        yield Finish("stop")

    def _answer(self, turns: Sequence[ChatTurn]) -> tuple[Sequence[str], bool]:
        """The tokens to send, and whether to fail after them."""
        prompt = _last_user_prompt(turns)
        tokens = cached_demo_tokens(prompt, self.paragraphs)
        fail = prompt.startswith(FAIL_PREFIX)
        return (tokens[:FAIL_AFTER_TOKENS] if fail else tokens), fail

    async def paced(self, count: int) -> AsyncIterator[range]:
        """Token indices 0 .. count - 1 in runs, each run once all of its tokens are due
        (`first_token_delay`, then one every 1 / `tokens_per_second` seconds).

        A run holds every token due by now (at most `_YIELD_EVERY`): one when the loop
        keeps up, the overdue ones together when it fell behind.
        """
        loop = asyncio.get_running_loop()
        start = loop.time() + self.first_token_delay
        interval = 1.0 / self.tokens_per_second if self.tokens_per_second > 0 else 0.0
        # The first token is due at `start` even without pacing.
        await asyncio.sleep(self.first_token_delay)
        index = 0
        while index < count:
            due = count
            if interval:
                # Due times count from `start`, not from the previous token, so time spent
                # in the consumer or the event loop never accumulates as drift.
                wait = start + index * interval - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                due = max(index + 1, int((loop.time() - start) / interval) + 1)
            end = min(due, count, index + _YIELD_EVERY)
            yield range(index, end)
            index = end
            if index < count and end < due:
                # More is due at once: hand control back to the event loop first so one
                # fast stream cannot starve every other connection on the node.
                await asyncio.sleep(0)
