"""Live fuzz of a running tokenwire: random and malformed frames at speed on `/ws`, random
requests to the HTTP API, while normal clients stream chats.

`python -m bench.fuzz [--frames 100000] [--seconds 60] [--websocket-server wire|uvicorn]
[--rounds 2] [--redis]` starts its own server (loopback, a free port; with `--redis` on a
redis-server it starts too) and prints what it tried and what it found; it exits 1 if
anything failed. `tests/integration/test_fuzz_live.py` runs the same fuzz at CI scale over both
WebSocket servers. Everything is bounded: a number of frames and requests, and a deadline
in seconds, whichever comes first.

The frames: a random mix (binary, junk text, near-valid frames, oversized ones, resumes and
cancels of unknown and of other users' streams, chats, replays, pings), and, for 40% of
them, frames by structure (`bench/fuzz_json.py` builds them from literals of known meaning
and `judge` states the promised answer): `deep-nesting` (arrays and objects at and around
MAX_NESTING and up to the byte limit), `numbers` (integer and double edges, literals that
are no JSON number), `escapes` (every escape, valid or not, in every place; BOM, UTF-16,
whitespace), `fields` (every field of every client frame type at its edges, repeated or
left out; a wrong or repeated `type`), `size-limit` (frames of exactly the byte limit and
just over, in multi-byte characters and escapes). The HTTP fuzz sends `POST /api/chat`
bodies made the same way and `POST /api/streams/<id>/cancel` with such bodies, each with
its one promised answer. Throwaway connections send text messages that are no UTF-8 (raw
frames: RFC 6455 wants close 1007) and valid ones split inside a character.

What is checked, per PROTOCOL.md ("bad input never closes a healthy connection ... the
server answers `error` and carries on"):

- every fuzz frame gets exactly the answer the protocol promises: one `error` frame with
  the right code (and id, where the frame had a valid one) for each bad frame, one `pong`
  per `ping` (with the same `t`, as a number), one `ack` (or `rate_limited`) per new
  `chat`; and nothing else. A missing answer is pinpointed after the run: the frames owed
  such an answer are sent again one at a time, so the report names the frame;
- every fuzz connection stays open and usable (a final `ping` gets its `pong`);
- the normal clients' texts are exactly the demo model's answers, once, in order; so are
  the fuzz connections' own chats (whatever their text), and every replay of them (a
  `resume` or the same `chat` again, from a random point, the end and beyond included);
  some chats' texts (NUL and all) and answers are read back from the history;
- every HTTP answer is 2xx or 4xx (never 5xx), errors in the `error` frame's JSON shape;
  the structured requests get exactly their promised status, code and id;
- the run is a warm-up and rounds: after each, `tokenwire_connections`,
  `tokenwire_sse_responses` and `tokenwire_tasks` are back to their baselines, and RSS
  grows in the last round only within what a round keeps (`RSS_PER_STREAM_LOG`);
- afterwards the server runs, every `tokenwire_contained_failures_total` is 0, and its log
  holds no traceback.

Frames are made by a seeded `random.Random`, so a run is reproducible from its seed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import string
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from backend.protocol import (
    BAD_FRAME,
    CONFLICT,
    MAX_NESTING,
    MAX_SEQ,
    NOT_FOUND,
    RATE_LIMITED,
    RETRYABLE,
    STREAM_EXPIRED,
    TOO_LARGE,
)
from backend.providers import demo_reply, demo_tokens
from backend.providers.demo import FAIL_PREFIX
from bench.fuzz_json import (
    FRAME_FIELDS,
    JSON_SPACE,
    Lit,
    Pair,
    Refused,
    any_value,
    hills,
    is_seq,
    judge,
    nest,
    number,
    obj_src,
    pair,
    random_text,
    string_lit,
    string_of,
    utf8_size,
    wide,
)
from harness.redis_server import start_redis
from harness.server import TIMEOUT, Client, Server, StreamView, start_server

PROTOCOL_CODES: Final = frozenset(RETRYABLE)
# The server under fuzz: small limits so oversized frames are cheap to make, fast demo
# streams, and rate limits high enough that the fuzz measures the decoder, not the limiter
# (a `rate_limited` answer is still accepted wherever the protocol allows one).
SERVER_SETTINGS: Final[dict[str, Any]] = {
    "max_frame_bytes": 8192,
    "max_text_chars": 2000,
    "demo_first_token_delay": 0.02,
    "demo_tokens_per_second": 400,
    "demo_paragraphs": 1,
    "chat_rate": 1000,
    "chat_burst": 1000,
    "connect_rate": 1000,
    "connect_burst": 1000,
    "log_level": "warning",
}
ID_CHARS: Final = string.ascii_letters + string.digits + "_-"
TRICKY: Final = [
    "\x00",
    "\x1b",
    "\r\n",
    "\u2028",
    "\x85",
    "\u202e",
    "\u200f",
    "\ufeff",
    "\U0001f600",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467",
    "data: x\n\n",
    '"',
    "\\",
    "{",
    "}",
]
FUZZ_PROMPT: Final = "fuzz"
SETTLE: Final = 10.0  # the most the answers to a connection's frames may trail its last send


# ---- what is sent and what must come back --------------------------------------------------


@dataclass(frozen=True)
class Fuzzed:
    """One frame to send (`str`: a text message, `bytes`: a binary one) and the answer the
    protocol promises: ("error", code, id), ("pong", t), ("chat", id) or ("none",)."""

    kind: str
    payload: str | bytes
    expect: tuple[Any, ...]


def _id(rng: random.Random) -> str:
    return "".join(rng.choices(ID_CHARS, k=rng.randint(1, 64)))


def _bad_id(rng: random.Random) -> str:
    choice = rng.randrange(5)
    if choice == 0:
        return ""
    if choice == 1:
        return "a" * rng.randint(65, 200)
    if choice == 2:
        return _id(rng)[:10] + rng.choice([*TRICKY, " ", "/", ".", "\n", "\u00e9"])
    if choice == 3:
        return rng.choice(TRICKY)
    return _id(rng) + "\n"


def _text(rng: random.Random, size: int) -> str:
    parts = []
    while sum(map(len, parts)) < size:
        parts.append(rng.choice(TRICKY) if rng.random() < 0.2 else rng.choice(string.printable))
    return "".join(parts)[:size]


def _junk_text(rng: random.Random) -> str:
    """Text that is no JSON object."""
    while True:
        choice = rng.randrange(4)
        if choice == 0:
            text = "".join(chr(rng.randrange(1, 0xD800)) for _ in range(rng.randint(0, 60)))
        elif choice == 1:
            text = _text(rng, rng.randint(0, 200))
        elif choice == 2:
            text = json.dumps(rng.choice([None, True, 5, -1.5, "chat", [], [{"type": "ping"}]]))
        else:
            text = rng.choice(["{", "}", "{{}}", "{'type':'ping'}", '{"type":}', "nul", "[1,"])
        try:
            if isinstance(json.loads(text), dict):
                continue
        except ValueError:
            pass
        return text


def _near_valid(rng: random.Random, ctx: FuzzContext) -> Fuzzed:
    """A frame one mutation away from valid, and the error it must get."""
    fid = _id(rng)
    chat = {"type": "chat", "id": fid, "conversation": _id(rng), "text": _text(rng, 20)}
    wrong_values = [None, True, 1.5, -1, [], {}, 10**20]
    choice = rng.randrange(12)
    if choice == 0:  # a required field missing
        frame = dict(chat)
        gone = rng.choice(["conversation", "text"])
        del frame[gone]
        return Fuzzed("near-valid", json.dumps(frame), ("error", BAD_FRAME, fid))
    if choice == 1:  # a field of the wrong JSON type
        frame = {**chat, rng.choice(["conversation", "text"]): rng.choice(wrong_values)}
        return Fuzzed("near-valid", json.dumps(frame), ("error", BAD_FRAME, fid))
    if choice == 2:  # an id outside [A-Za-z0-9_-]{1,64}
        frame = {**chat, "id": _bad_id(rng)}
        return Fuzzed("near-valid", _dumps(rng, frame), ("error", BAD_FRAME, None))
    if choice == 3:  # `after` negative, fractional, a string, or beyond MAX_SEQ
        after = rng.choice([-1, -(2**63), 0.5, "3", MAX_SEQ + 1, 2**64, 10**30, None, True])
        frame = {"type": "resume", "id": fid, "after": after}
        return Fuzzed("near-valid", json.dumps(frame), ("error", BAD_FRAME, fid))
    if choice == 4:  # an unknown type, or none
        kind = rng.choice([_text(rng, 6), "Chat", "CHAT", "chat ", "", 5, None, ["chat"]])
        frame = {"type": kind, "id": fid} if kind is not None else {"id": fid, "text": "x"}
        return Fuzzed("near-valid", json.dumps(frame), ("error", BAD_FRAME, fid))
    if choice == 5:  # a valid frame cut short
        raw = json.dumps(chat)
        return Fuzzed("near-valid", raw[: rng.randrange(len(raw))], ("error", BAD_FRAME, None))
    if choice == 6:  # a valid frame wrapped or doubled
        raw = json.dumps({"type": "ping", "t": 1})
        text = rng.choice([f"[{raw}]", raw + raw, raw + ",", f'"{raw}"', raw[:-1] + ",}"])
        return Fuzzed("near-valid", text, ("error", BAD_FRAME, None))
    if choice == 7:  # ping/pong with a `t` that is not a number
        frame = {"type": rng.choice(["ping", "pong"]), "t": rng.choice([None, "1", True, [1]])}
        return Fuzzed("near-valid", json.dumps(frame), ("error", BAD_FRAME, None))
    if choice == 8:  # cancel/resume without an id
        frame = rng.choice([{"type": "cancel"}, {"type": "resume", "after": 0}])
        return Fuzzed("near-valid", json.dumps(frame), ("error", BAD_FRAME, None))
    if choice == 9:  # text over the character limit, frame under the byte limit
        text = "y" * (ctx.max_text + rng.randint(1, 100))
        return Fuzzed("near-valid", json.dumps({**chat, "text": text}), ("error", TOO_LARGE, fid))
    if choice == 10:  # lone surrogate escapes: valid JSON syntax, no Unicode
        raw = json.dumps({**chat, "text": "a\ud800b"})
        return Fuzzed("near-valid", raw, ("error", BAD_FRAME, None))
    # Duplicate keys, the last one wrong: a parser keeping the first would accept it.
    raw = f'{{"type":"cancel","id":"{fid}","id":"a b"}}'
    return Fuzzed("near-valid", raw, ("error", BAD_FRAME, None))


def _dumps(rng: random.Random, frame: dict[str, Any]) -> str:
    return json.dumps(frame, ensure_ascii=rng.random() < 0.5)


@dataclass
class FuzzContext:
    """What the frame maker knows: the limits, and ids of other users' streams."""

    max_bytes: int
    max_text: int
    others: list[str] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)  # the demo tokens of FUZZ_PROMPT
    first_other: asyncio.Event = field(default_factory=asyncio.Event)
    paragraphs: int = 1  # the demo model's, for the answer to any other prompt


@dataclass
class OwnStreams:
    """The streams one fuzz connection started: `chats` sent, `ended` seen done, `finished`
    ended and not being replayed now (a replay is sent only for those); for each, `sent`
    its (conversation, text) and `answers` the demo model's tokens for its text."""

    chats: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)
    finished: list[str] = field(default_factory=list)
    sent: dict[str, tuple[str, str]] = field(default_factory=dict)
    answers: dict[str, list[str]] = field(default_factory=dict)

    def start(
        self, used: set[str], sid: str, conversation: str, text: str, answer: list[str]
    ) -> None:
        used.update((sid, f"chat:{sid}"))
        self.chats.add(sid)
        self.sent[sid] = (conversation, text)
        self.answers[sid] = answer


def make_frame(
    rng: random.Random, ctx: FuzzContext, used: set[str], own: OwnStreams | None = None
) -> Fuzzed:
    """The next fuzz frame. `used` holds this connection's resumed and chatted ids (a second
    resume of an id supersedes the first: one answer for two frames, so none repeats), and
    `chat:<id>` for its chats (that id is this user's own stream from then on)."""
    own = OwnStreams() if own is None else own

    def fresh(candidate: str) -> str:
        while candidate in used:
            candidate = _id(rng)
        used.add(candidate)
        return candidate

    if rng.random() < STRUCTURED_SHARE:
        return structured_frame(rng, ctx, used, own)
    roll = rng.random()
    if roll < 0.12:
        return Fuzzed("binary", rng.randbytes(rng.randint(0, 300)), ("error", BAD_FRAME, None))
    if roll < 0.27:
        return Fuzzed("junk-text", _junk_text(rng), ("error", BAD_FRAME, None))
    if roll < 0.62:
        return _near_valid(rng, ctx)
    if roll < 0.66:
        size = ctx.max_bytes + rng.randint(1, 3 * ctx.max_bytes)
        pad = {"type": "ping", "t": 1, "pad": "z" * size}
        return Fuzzed("oversized", json.dumps(pad), ("error", TOO_LARGE, None))
    if roll < 0.74:
        # After 0 an unknown id is `not_found`; after more, the client claims to have seen
        # tokens of it, so it existed for this user and its log is gone: `stream_expired`.
        sid = fresh(_id(rng))
        after = rng.choice([0, 0, 1, rng.randrange(MAX_SEQ)])
        frame = {"type": "resume", "id": sid, "after": after}
        code = NOT_FOUND if after == 0 else STREAM_EXPIRED
        return Fuzzed("resume-unknown", json.dumps(frame), ("error", code, sid))
    if roll < 0.80:
        sid = _id(rng)
        while sid in used:  # not one of this user's streams, which a cancel may stop
            sid = _id(rng)
        return Fuzzed(
            "cancel-unknown", json.dumps({"type": "cancel", "id": sid}), ("error", NOT_FOUND, sid)
        )
    if roll < 0.86 and ctx.others:
        # Another user's stream: the same answer as for an id nobody used (no existence leak).
        sid = rng.choice(ctx.others)
        if f"chat:{sid}" not in used:  # unless this user started a stream of that id
            if rng.random() < 0.5 or sid in used:
                frame = {"type": "cancel", "id": sid}
                return Fuzzed("other-user", json.dumps(frame), ("error", NOT_FOUND, sid))
            used.add(sid)
            frame = {"type": "resume", "id": sid, "after": 0}
            return Fuzzed("other-user", json.dumps(frame), ("error", NOT_FOUND, sid))
    if roll < 0.875:
        # A chat, half of them reusing another user's id: ids are per user, so that starts
        # a stream of this user's own.
        sid = rng.choice(ctx.others) if ctx.others and rng.random() < 0.5 else _id(rng)
        if sid not in used:
            conversation = _id(rng)
            own.start(used, sid, conversation, FUZZ_PROMPT, ctx.answer)
            frame = {"type": "chat", "id": sid, "conversation": conversation, "text": FUZZ_PROMPT}
            return Fuzzed("chat", json.dumps(frame), ("chat", sid))
    if roll < 0.89 and own.finished:
        # Replay an own finished stream from anywhere, its end and beyond included.
        sid = own.finished.pop(rng.randrange(len(own.finished)))
        after = rng.randint(0, len(own.answers[sid]) + 3)
        frame = {"type": "resume", "id": sid, "after": after}
        return Fuzzed("resume-own", json.dumps(frame), ("replay", sid, after))
    if roll < 0.95:
        t: int | float = rng.choice([rng.randrange(-(2**53), 2**53), rng.uniform(-1e9, 1e9)])
        extra = {"extra": _text(rng, 5)} if rng.random() < 0.3 else {}
        return Fuzzed("ping", json.dumps({"type": "ping", "t": t, **extra}), ("pong", t))
    return Fuzzed("pong", json.dumps({"type": "pong", "t": rng.randrange(2**40)}), ("none",))


# ---- frames by structure -------------------------------------------------------------------
#
# Each generator builds a frame from literals whose meaning it knows (bench/fuzz_json.py) and
# takes the promised answer from `fuzz_json.judge`. A generator returns None when the frame
# it drew would touch this connection's own streams (an accepted cancel of one, a second
# resume of an id): `structured_frame` then draws again.

STRUCTURED_SHARE: Final = 0.4  # of the fuzz frames; the rest are the random mix above
FRAME_TYPES: Final = ("chat", "resume", "cancel", "ping", "pong")
# Every field of every client frame type (PROTOCOL.md): the "fields" generator's slots.
FIELD_SLOTS: Final = (
    ("chat", "id"),
    ("chat", "conversation"),
    ("chat", "text"),
    ("chat", "after"),
    ("resume", "id"),
    ("resume", "after"),
    ("cancel", "id"),
    ("ping", "t"),
    ("pong", "t"),
)


def _fresh_id(rng: random.Random, used: set[str]) -> str:
    while True:
        candidate = _id(rng)
        if candidate not in used:
            return candidate


def _time_lit(rng: random.Random) -> Lit:
    if rng.random() < 0.5:
        n = rng.randrange(-(2**53), 2**53 + 1)
        return Lit(str(n), n)
    x = rng.uniform(-1e6, 1e6)
    return Lit(repr(x), x)


def _valid_value(rng: random.Random, ctx: FuzzContext, used: set[str], name: str) -> Lit:
    """A valid value of field `name` (ids unused on this connection), now and then escaped."""
    escape = 0.05
    if name in ("id", "conversation"):
        return string_of(rng, _fresh_id(rng, used), escape)
    if name == "text":
        return string_of(rng, FUZZ_PROMPT, escape)
    if name == "after":
        after = rng.choice([0, 0, 1, rng.randrange(MAX_SEQ + 1)])
        return Lit(str(after), after)
    return _time_lit(rng)


def _frame_pairs(
    rng: random.Random, ctx: FuzzContext, used: set[str], kind: str, *, optional: bool = False
) -> list[Pair]:
    """A valid frame of type `kind`, its fields in a random order (`type` among them)."""
    pairs = [pair(rng, "type", string_of(rng, kind, 0.05))]
    for name, (_, required) in FRAME_FIELDS[kind].items():
        if required or optional:
            pairs.append(pair(rng, name, _valid_value(rng, ctx, used, name)))
    rng.shuffle(pairs)
    return pairs


def _answered(
    name: str,
    ctx: FuzzContext,
    used: set[str],
    own: OwnStreams,
    pairs: list[Pair],
    payload: str | None = None,
    rng: random.Random | None = None,
) -> Fuzzed | None:
    """The frame of `pairs` (or `payload`, its text when the generator wrote it) with the
    answer `judge` promises; None if it would touch this connection's own streams."""
    if payload is None:
        assert rng is not None
        payload = obj_src(rng, pairs)
    verdict = judge(pairs, utf8_size(payload), ctx.max_bytes, ctx.max_text)
    if isinstance(verdict, Refused):
        return Fuzzed(name, payload, ("error", verdict.code, verdict.id))
    f = verdict.fields
    if verdict.type == "ping":
        return Fuzzed(name, payload, ("pong", f["t"]))
    if verdict.type == "pong":
        return Fuzzed(name, payload, ("none",))
    sid = f["id"]
    if verdict.type == "cancel":
        # Any id this connection named may be (or become) its own stream: a cancel would stop it.
        return None if sid in used else Fuzzed(name, payload, ("error", NOT_FOUND, sid))
    if verdict.type == "resume":
        if sid in used:
            return None
        used.add(sid)
        code = NOT_FOUND if f["after"] == 0 else STREAM_EXPIRED
        return Fuzzed(name, payload, ("error", code, sid))
    if sid in own.sent:
        if sid not in own.finished:
            return None  # still streaming, or being replayed
        if own.sent[sid] != (f["conversation"], f["text"]):
            return Fuzzed(name, payload, ("error", CONFLICT, sid))
        # The same chat again: acked again, and its stream replayed from `after`.
        own.finished.remove(sid)
        return Fuzzed(name, payload, ("chat-replay", sid, f.get("after", 0)))
    if sid in used or f["text"].startswith(FAIL_PREFIX):
        return None
    own.start(used, sid, f["conversation"], f["text"], demo_tokens(f["text"], ctx.paragraphs))
    return Fuzzed(name, payload, ("chat", sid))


def _cheap_kind(rng: random.Random) -> str:
    """A frame type for a generator's carrier frame: mostly ones without a stream to run."""
    return rng.choices(FRAME_TYPES, weights=[1, 4, 4, 6, 2])[0]


def _deep_nesting(
    rng: random.Random, ctx: FuzzContext, used: set[str], own: OwnStreams
) -> Fuzzed | None:
    """Arrays and objects nested at and around MAX_NESTING, and up to the frame's byte limit:
    bare, balanced or not, in unknown and in known fields, beside strings full of brackets,
    wide, or rising and falling."""
    name = "deep-nesting"
    limit = ctx.max_bytes
    near = rng.randint(MAX_NESTING - 3, MAX_NESTING + 3)
    far = int(math.exp(rng.uniform(math.log(MAX_NESTING), math.log(limit // 2))))
    depth = rng.choice([near, near, far])
    form = rng.randrange(8)
    if form == 0:  # bare brackets, up to the byte limit and just beyond
        n = rng.choice([depth, limit, limit - 1, limit + 1, rng.randint(1, limit)])
        text = "".join(rng.choice("[[[{") for _ in range(n)) if rng.random() < 0.3 else "[" * n
        if rng.random() < 0.3:
            n = rng.choice([n // 2, limit // 2, limit // 2 + 1])
            text = "[" * n + "]" * n  # an array, balanced: still no object
        code = TOO_LARGE if utf8_size(text) > limit else BAD_FRAME
        return Fuzzed(name, text, ("error", code, None))
    pairs = _frame_pairs(rng, ctx, used, _cheap_kind(rng))
    if form == 1:  # a balanced nest in an unknown field: the frame is `depth` deep
        pairs.append(pair(rng, rng.choice(["x", "pad", "[", "{"]), nest(rng, depth - 1)))
    elif form == 2:  # the nest in a known field: that field is wrong, if not too deep
        field_name = rng.choice(["id", "t", "after", "conversation", "text", "type"])
        pairs = [p for p in pairs if p[0].value != field_name]
        pairs.append(pair(rng, field_name, nest(rng, depth - 1)))
    elif form == 3:  # unbalanced: no JSON however deep
        # (Fewer closers than openers in all: nothing after it can make the text JSON.)
        pairs.append(pair(rng, "x", nest(rng, depth, balanced=False)))
    elif form == 4:  # brackets in strings (keys, values, escaped quotes) do not count
        brackets = "".join(rng.choice('[[[{{]}"\\') for _ in range(rng.randint(33, 400)))
        pairs.append(pair(rng, brackets[:40], string_of(rng, brackets, 0.2), 0.2))
        if rng.random() < 0.7:
            pairs.append(pair(rng, "n", nest(rng, depth - 1)))
    elif form == 5:  # many brackets, shallow
        pairs.append(pair(rng, "w", wide(rng, rng.randint(MAX_NESTING, 1500))))
    elif form == 6:  # up and down: the deepest run counts
        depths = [rng.randint(1, depth) for _ in range(rng.randint(2, 8))]
        depths[rng.randrange(len(depths))] = max(1, depth - 2)
        pairs.append(pair(rng, "h", hills(rng, depths)))
    else:  # a deep nest beside an escaped lone surrogate: depth is judged first
        pairs.append(pair(rng, "n", nest(rng, depth - 1)))
        pairs.append(pair(rng, "s", string_lit(rng, 4, bad=True)))
    rng.shuffle(pairs)
    return _answered(name, ctx, used, own, pairs, rng=rng)


def _numbers(
    rng: random.Random, ctx: FuzzContext, used: set[str], own: OwnStreams
) -> Fuzzed | None:
    """Number literals (integer and double edges, rounding, -0, beyond a double, text that
    is no JSON number) in `t`, `after`, fields that want a string, and unknown fields."""
    name = "numbers"
    lit = number(rng)
    where = rng.randrange(7)
    if where <= 1:  # ping/pong `t`, now and then beside a valid or invalid `id`
        kind = "ping" if where == 0 else "pong"
        pairs = [pair(rng, "type", Lit(f'"{kind}"', kind)), pair(rng, "t", lit)]
        if rng.random() < 0.4:
            pairs.append(pair(rng, "id", string_of(rng, rng.choice([_id(rng), "a b"]))))
    elif where == 2:  # resume `after`
        pairs = _frame_pairs(rng, ctx, used, "resume")
        pairs = [p for p in pairs if p[0].value != "after"] + [pair(rng, "after", lit)]
    elif where == 3:  # chat `after`: a new chat (streams whole whatever `after`), or a replay
        if own.finished and rng.random() < 0.6:
            sid = rng.choice(own.finished)
            conversation, text = own.sent[sid]
            pairs = [
                pair(rng, "type", Lit('"chat"', "chat")),
                pair(rng, "id", string_of(rng, sid, 0.05)),
                pair(rng, "conversation", string_of(rng, conversation, 0.05)),
                pair(rng, "text", string_of(rng, text, 0.05)),
            ]
            if is_seq(lit.value) and lit.value > 0 and rng.random() < 0.7:
                after = lit.value % (len(own.answers[sid]) + 4)  # mostly within the stream
                lit = Lit(str(after), after)
            pairs.append(pair(rng, "after", lit))
        else:
            pairs = [*_frame_pairs(rng, ctx, used, "chat"), pair(rng, "after", lit)]
    elif where == 4:  # a field that wants a string
        kind = rng.choice(["cancel", "resume", "chat"])
        pairs = _frame_pairs(rng, ctx, used, kind)
        field_name = rng.choice([n for n in FRAME_FIELDS[kind] if n != "after"] + ["type"])
        pairs = [p for p in pairs if p[0].value != field_name] + [pair(rng, field_name, lit)]
    else:  # unknown fields: skipped unchecked, whatever the number (if it is JSON)
        pairs = _frame_pairs(rng, ctx, used, _cheap_kind(rng))
        value = lit
        if rng.random() < 0.4:
            other = number(rng)
            value = Lit(f"[{lit.src},{other.src}]", [], lit.ok and other.ok, 1)
        pairs.append(pair(rng, rng.choice(["n", "T", "after_", "seq"]), value))
    rng.shuffle(pairs)
    return _answered(name, ctx, used, own, pairs, rng=rng)


NOT_JSON_SPACE: Final = ["\u00a0", "\u2028", "\u3000", "\x0b", "\x0c", "\x85", "\ufeff", "\x00"]


def _escapes(
    rng: random.Random, ctx: FuzzContext, used: set[str], own: OwnStreams
) -> Fuzzed | None:
    """Strings with every kind of escape and raw character, valid and not, in every place
    (ids, keys, `type`, text, unknown fields); a BOM; other encodings; whitespace."""
    name = "escapes"
    form = rng.randrange(9)
    if form == 0:  # an id written with escapes: the id is what they stand for
        kind = rng.choice(["cancel", "resume"])
        pairs = _frame_pairs(rng, ctx, used, kind)
        value = _fresh_id(rng, used)
        if rng.random() < 0.4:  # an escape of a character no id may hold
            at = rng.randint(0, len(value))
            value = (value[:at] + rng.choice("/\n \u00e9\x00.\u0130\uff21\u200b") + value[at:])[:64]
        pairs = [p for p in pairs if p[0].value != "id"]
        pairs.append(pair(rng, "id", string_of(rng, value, rng.choice([0.5, 1.0]))))
    elif form == 1:  # an unknown field's string: any escape; an invalid one makes no JSON
        pairs = _frame_pairs(rng, ctx, used, _cheap_kind(rng))
        bad = rng.random() < 0.5
        pairs.append(pair(rng, "x", string_lit(rng, rng.randint(0, 40), bad, rng.random())))
    elif form == 2:  # every key and the `type` written with escapes
        pairs = [
            (string_of(rng, k.value, 1.0), string_of(rng, v.value, 0.7) if k.value == "type" else v)
            for k, v in _frame_pairs(rng, ctx, used, _cheap_kind(rng))
        ]
    elif form == 3:  # an escape that no JSON allows, in a known field
        kind = rng.choice(["chat", "cancel", "resume"])
        pairs = _frame_pairs(rng, ctx, used, kind)
        field_name = rng.choice(
            ["id", "type"] + (["conversation", "text"] if kind == "chat" else [])
        )
        pairs = [p for p in pairs if p[0].value != field_name]
        pairs.append(pair(rng, field_name, string_lit(rng, rng.randint(0, 10), bad=True)))
    elif form == 4:  # a chat whose text holds escapes, NUL, astral characters: streamed, stored
        pairs = _frame_pairs(rng, ctx, used, "chat")
        text = random_text(rng, rng.randint(1, 60))
        if rng.random() < 0.5:
            text = text[:5] + "\x00" + text[5:]
        pairs = [p for p in pairs if p[0].value != "text"]
        pairs.append(pair(rng, "text", string_of(rng, text, rng.random())))
    elif form == 5:  # a BOM before the object (no JSON); inside a string it is a character
        pairs = _frame_pairs(rng, ctx, used, _cheap_kind(rng))
        if rng.random() < 0.5:
            return Fuzzed(name, "\ufeff" + obj_src(rng, pairs), ("error", BAD_FRAME, None))
        pairs.append(pair(rng, "bom", Lit('"\ufeff"', "\ufeff")))
    elif form == 6:  # another encoding: UTF-16 or UTF-32 (as text when that is UTF-8)
        pairs = _frame_pairs(rng, ctx, used, _cheap_kind(rng))
        raw = obj_src(rng, pairs).encode(
            rng.choice(["utf-16-le", "utf-16-be", "utf-32-le", "utf-16"])
        )
        try:
            payload: str | bytes = raw.decode("utf-8")
        except UnicodeDecodeError:
            payload = raw  # a binary frame: refused as well
        return Fuzzed(name, payload, ("error", BAD_FRAME, None))
    elif form == 7:  # JSON whitespace anywhere is fine; other space characters are no JSON
        pairs = _frame_pairs(rng, ctx, used, _cheap_kind(rng))
        text = obj_src(rng, pairs, spaced=1.0)
        text = rng.choice(JSON_SPACE) + text + rng.choice(JSON_SPACE)
        if rng.random() < 0.5:
            return _answered(name, ctx, used, own, pairs, text)
        at = rng.choice([0, 1, len(text) - 1, len(text)])
        text = text[:at] + rng.choice(NOT_JSON_SPACE) + text[at:]
        return Fuzzed(name, text, ("error", BAD_FRAME, None))
    else:  # the frame written with ensure_ascii-style escapes throughout, or none at all
        pairs = [
            (k, string_of(rng, v.value, rng.choice([0.0, 1.0])) if type(v.value) is str else v)
            for k, v in _frame_pairs(rng, ctx, used, rng.choice(FRAME_TYPES))
        ]
    rng.shuffle(pairs)
    return _answered(name, ctx, used, own, pairs, rng=rng)


def _ident_value(rng: random.Random, used: set[str]) -> Lit:
    """An `id` or `conversation`: valid at its edges (1 and 64 characters, `-`, `_`) or not
    (empty, 65 characters, a character outside [A-Za-z0-9_-], not a string)."""
    choice = rng.randrange(10)
    if choice == 0:
        return string_of(rng, rng.choice(ID_CHARS) + _fresh_id(rng, used)[:63], 0.3)
    if choice == 1:
        value = "".join(rng.choices(ID_CHARS, k=64))
        return string_of(rng, value, 0.1)
    if choice == 2:
        return string_of(rng, _fresh_id(rng, used), 0.5)
    if choice == 3:
        return string_of(rng, rng.choice(["", "a" * 65, "_" * 65]))
    if choice in (4, 5):
        base = _fresh_id(rng, used)[:60]
        at = rng.randint(0, len(base))
        odd = rng.choice([" ", ".", "/", "\u00e9", "\n", "\x00", "\u0130", "\uff21", "\u200b", "+"])
        return string_of(rng, base[:at] + odd + base[at:], 0.3)
    if choice == 6:
        return string_of(rng, _fresh_id(rng, used)[:63] + "\n")  # `$` would admit it
    if choice == 7:
        return number(rng)
    return any_value(rng)


def _text_value(rng: random.Random, ctx: FuzzContext) -> Lit:
    """A chat `text`: empty, short, exactly at the character limit and one beyond (ASCII or
    astral characters, which are 4 bytes and one character each), or not a string."""
    choice = rng.randrange(8)
    if choice == 0:
        return string_of(rng, "")
    if choice == 1:
        return string_of(rng, random_text(rng, rng.randint(1, 30)), 0.3)
    if choice in (2, 3):
        size = ctx.max_text + rng.choice([0, 0, 1])
        char = rng.choice(["y", "\u00e9", "\U0001f600"])
        return string_of(rng, char * size, 0.0)
    if choice == 4:
        return string_of(rng, FUZZ_PROMPT + "\x00" + random_text(rng, 5), 0.5)
    if choice == 5:
        return number(rng)
    return any_value(rng)


def _field_value(rng: random.Random, ctx: FuzzContext, used: set[str], name: str) -> Lit:
    if name in ("id", "conversation"):
        return _ident_value(rng, used)
    if name == "text":
        return _text_value(rng, ctx)
    # `after` and `t`: numbers mostly, other JSON types now and then
    return number(rng) if rng.random() < 0.75 else any_value(rng)


TYPE_VALUES: Final = ["Chat", "PING", "ping ", " ping", "", "pin", "pingg", "error", "hello"]


def _fields(rng: random.Random, ctx: FuzzContext, used: set[str], own: OwnStreams) -> Fuzzed | None:
    """One field of one frame type given an edge value, repeated (a valid and a wrong
    occurrence, either first), or left out; or the `type` itself wrong or repeated."""
    name = "fields"
    kind, field_name = rng.choice(FIELD_SLOTS)
    if kind == "chat" and own.finished and rng.random() < 0.3:
        # The same chat again (a replay), or with another text or conversation (conflict).
        sid = rng.choice(own.finished)
        conversation, text = own.sent[sid]
        values = {"id": sid, "conversation": conversation, "text": text}
        if rng.random() < 0.3:
            changed = rng.choice(["conversation", "text"])
            values[changed] = values[changed] + "x"
        pairs = [pair(rng, "type", Lit('"chat"', "chat"))]
        pairs += [pair(rng, k, string_of(rng, v, 0.05)) for k, v in values.items()]
        if rng.random() < 0.7:
            after = rng.randint(0, len(own.answers[sid]) + 3)
            pairs.append(pair(rng, "after", Lit(str(after), after)))
    else:
        pairs = _frame_pairs(rng, ctx, used, kind, optional=rng.random() < 0.5)
    mode = rng.randrange(6)
    edge = _field_value(rng, ctx, used, field_name)
    if mode in (0, 1):  # the field replaced by the edge value
        pairs = [p for p in pairs if p[0].value != field_name] + [pair(rng, field_name, edge)]
    elif mode == 2:  # the field twice: each occurrence is checked, the last one counts
        valid = pair(rng, field_name, _valid_value(rng, ctx, used, field_name))
        second = pair(rng, field_name, edge)
        pairs = [p for p in pairs if p[0].value != field_name]
        pairs += [valid, second] if rng.random() < 0.5 else [second, valid]
    elif mode == 3:  # the field left out (required, or the chat's optional `after`)
        pairs = [p for p in pairs if p[0].value != field_name]
    elif mode == 4:  # `type` wrong, or repeated (the same or another)
        pairs = [p for p in pairs if p[0].value != "type"]
        if rng.random() < 0.5:
            value = rng.choice(TYPE_VALUES)
            pairs.append(pair(rng, "type", string_of(rng, value, 0.2)))
        else:
            other = rng.choice([kind, *FRAME_TYPES])
            pairs += [
                pair(rng, "type", Lit(f'"{kind}"', kind)),
                pair(rng, "type", Lit(f'"{other}"', other)),
            ]
    else:  # the edge value plus an unknown field of any type
        pairs = [p for p in pairs if p[0].value != field_name] + [pair(rng, field_name, edge)]
        pairs.append(pair(rng, rng.choice(["extra", "ID", "Type", "t_", "id "]), any_value(rng)))
    if mode != 2:
        rng.shuffle(pairs)
    return _answered(name, ctx, used, own, pairs, rng=rng)


def _size_limit(
    rng: random.Random, ctx: FuzzContext, used: set[str], own: OwnStreams
) -> Fuzzed | None:
    """Frames of exactly the byte limit (accepted), one to three bytes over (too_large) or
    one under, padded with 1- to 4-byte characters and escapes: the limit is UTF-8 bytes."""
    name = "size-limit"
    pairs = _frame_pairs(rng, ctx, used, _cheap_kind(rng))
    pairs.append((Lit('"pad"', "pad"), Lit('""', "")))
    target = ctx.max_bytes + rng.choice([-1, 0, 0, 0, 1, 1, 2, 3])
    fill = max(0, target - utf8_size(obj_src(rng, pairs, spaced=0.0)))
    # A unit of the pad: its source, and the character it stands for. An escape counts as
    # the bytes sent (6), not as the character it decodes to.
    src, char = rng.choice(
        [
            ("z", "z"),
            ("\u00e9", "\u00e9"),
            ("\u20ac", "\u20ac"),
            ("\U0001f600", "\U0001f600"),
            ("\\u00e9", "\u00e9"),
        ]
    )
    count = fill // utf8_size(src)
    rest = fill - count * utf8_size(src)
    pad = Lit(f'"{src * count}{"z" * rest}"', char * count + "z" * rest)
    pairs[-1] = (pairs[-1][0], pad)
    return _answered(name, ctx, used, own, pairs, obj_src(rng, pairs, spaced=0.0))


STRUCTURED: Final[dict[str, Callable[..., Fuzzed | None]]] = {
    "deep-nesting": _deep_nesting,
    "numbers": _numbers,
    "escapes": _escapes,
    "fields": _fields,
    "size-limit": _size_limit,
}


def structured_frame(
    rng: random.Random, ctx: FuzzContext, used: set[str], own: OwnStreams
) -> Fuzzed:
    """A frame by structure, of a kind drawn at random."""
    make = rng.choice(list(STRUCTURED.values()))
    while True:
        fuzzed = make(rng, ctx, used, own)
        if fuzzed is not None:
            return fuzzed


# ---- one fuzz connection -------------------------------------------------------------------


@dataclass
class ConnectionResult:
    tried: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # error frames received, by code
    problems: list[str] = field(default_factory=list)
    dropped: bool = False
    stored: int = 0  # chats whose stored messages were read back and matched
    suspects: list[Fuzzed] = field(default_factory=list)  # frames whose answer went missing


def _key(expect: tuple[Any, ...]) -> str:
    if expect[0] == "pong":
        # `t` compares as a number: 1e2 comes back 100.0, -0 as 0 (every integer within
        # 2**53 is exactly a double).
        return json.dumps(("pong", repr(float(expect[1]) + 0.0)))
    return json.dumps(expect)


@dataclass
class Replay:
    """A resume of one of this connection's finished streams: what it must deliver."""

    after: int
    want: str  # the answer's text after `after`
    text: str = ""
    last: int = 0


STORED_CHECKS: Final = 2  # per connection: chats with texts of their own, read back over HTTP


async def fuzz_connection(
    server: Server, rng: random.Random, ctx: FuzzContext, count: int, deadline: float
) -> ConnectionResult:
    """Send up to `count` fuzz frames (until `deadline`) on one new connection, reading
    concurrently; then check every answer, and that a final ping is answered. The
    connection's own chats must stream the demo answer to their text exactly, and so must
    every replay of them (a `resume` from a random point once one has ended, or the same
    `chat` again); a few chats with texts of their own are read back from the history."""
    result = ConnectionResult()
    expected: Counter[str] = Counter()
    received: Counter[str] = Counter()
    state = OwnStreams()
    acked: set[str] = set()
    refused: set[str] = set()  # chats answered `rate_limited`
    views: dict[str, StreamView] = {}
    replays: dict[str, Replay] = {}
    used: set[str] = set()
    extra: list[str] = []
    sent_as: dict[str, list[Fuzzed]] = {}  # the frames sent for each expected answer
    stray: Counter[str | None] = Counter()  # token and done frames of streams not acked
    client = await Client.connect(server)
    ws = client.ws
    final_t = rng.randrange(2**52, 2**53)

    def on_stream_frame(frame: dict[str, Any]) -> None:
        sid, kind = frame["id"], frame["type"]
        tokens = state.answers[sid]
        replay = replays.get(sid)
        if replay is None:  # the chat's own stream
            view = views.setdefault(sid, StreamView())
            view.apply(frame)
            if kind == "done":
                if (
                    view.text != "".join(tokens)
                    or view.duplicates
                    or view.gaps
                    or frame["seq"] != len(tokens)
                ):
                    extra.append(f"chat {sid}: not the exact answer ({frame})")
                state.ended.add(sid)
                state.finished.append(sid)
            return
        if kind == "token":
            first = frame["seq"] - frame.get("n", 1) + 1
            if first != replay.last + 1:
                extra.append(
                    f"replay of {sid} after {replay.after}: token {frame} after {replay.last}"
                )
            replay.text += frame["data"]
            replay.last = frame["seq"]
        elif kind == "done":
            del replays[sid]
            if replay.text == replay.want and frame["seq"] == len(tokens):
                received[_key(("replay", sid))] += 1
            else:
                extra.append(f"replay of {sid} after {replay.after} not exact: {frame}")
            state.finished.append(sid)

    async def read() -> None:
        async for message in ws:
            frame = json.loads(message)
            kind = frame["type"]
            if kind == "error":
                result.errors[frame["code"]] += 1
                if frame["code"] not in PROTOCOL_CODES:
                    extra.append(f"error code {frame['code']!r} is not in PROTOCOL.md")
                if frame.get("id") in state.chats and frame["code"] == RATE_LIMITED:
                    refused.add(frame["id"])
                    received[_key(("chat", frame["id"]))] += 1
                else:
                    received[_key(("error", frame["code"], frame.get("id")))] += 1
            elif kind == "pong":
                received[_key(("pong", frame["t"]))] += 1
                if frame["t"] == final_t:
                    return
            elif kind == "ping":
                await ws.send(json.dumps({"type": "pong", "t": frame["t"]}))
            elif kind == "ack" and frame["id"] in state.chats:
                acked.add(frame["id"])
                received[_key(("chat", frame["id"]))] += 1
                if frame.get("conversation") != state.sent[frame["id"]][0]:
                    extra.append(f"ack of another conversation: {message[:200]}")
            elif kind in ("token", "done") and frame["id"] in acked:
                on_stream_frame(frame)
            elif kind in ("token", "done"):
                stray[frame.get("id")] += 1
            else:
                extra.append(f"unexpected frame {message[:200]}")

    reader = asyncio.create_task(read())
    try:
        for sent in range(count):
            if time.monotonic() > deadline or reader.done():
                break
            fuzzed = make_frame(rng, ctx, used, state)
            result.tried[fuzzed.kind] += 1
            if fuzzed.expect[0] in ("replay", "chat-replay"):
                what, sid, after = fuzzed.expect
                want = "".join(state.answers[sid][after:])
                replays[sid] = Replay(after, want, last=after)
                expected[_key(("replay", sid))] += 1
                if what == "chat-replay":  # acked again first
                    expected[_key(("chat", sid))] += 1
            elif fuzzed.expect[0] != "none":
                expected[_key(fuzzed.expect)] += 1
            if fuzzed.expect[0] != "none":
                sent_as.setdefault(_key(fuzzed.expect), []).append(fuzzed)
            await ws.send(fuzzed.payload)
            if sent % 16 == 0:
                # A send returns at once while the socket buffer has room: let the reader in.
                await asyncio.sleep(0)
            if sent == count // 2:
                # Halfway, let an own stream end so that every connection replays some,
                # however fast its frames go out (bounded: the checks below report a hang).
                wait_until = time.monotonic() + SETTLE
                while (
                    not state.finished and state.chats - refused and time.monotonic() < wait_until
                ):
                    if reader.done():
                        break
                    await asyncio.sleep(0.01)
        # Answers from log reads (resumes) may trail: wait for all before the final ping.
        settle = time.monotonic() + SETTLE
        while (
            any(received[k] < n for k, n in expected.items()) or not acked <= state.ended or replays
        ) and time.monotonic() < settle:
            if reader.done():
                break
            await asyncio.sleep(0.02)
        await ws.send(json.dumps({"type": "ping", "t": final_t}))
        await asyncio.wait({reader}, timeout=TIMEOUT)
    except ConnectionClosed as exc:
        result.dropped = True
        result.problems.append(f"connection closed by the server: {exc!r}")
    finally:
        if not reader.done():
            reader.cancel()
            if not result.dropped:
                result.problems.append("no pong to the final ping")
        await asyncio.gather(reader, return_exceptions=True)
        await client.close()
    if reader.done() and not reader.cancelled() and (failure := reader.exception()):
        result.dropped |= isinstance(failure, ConnectionClosed)
        result.problems.append(f"reading failed: {failure!r}")
    received[_key(("pong", final_t))] -= 1
    for key in expected.keys() | received.keys():
        if received[key] != expected[key]:
            result.problems.append(f"{key}: expected {expected[key]}, received {received[key]}")
        if received[key] < expected[key]:
            # One of these frames got another answer: `pinpoint` finds which, and what.
            result.suspects += sent_as.get(key, [])
    if not result.dropped:
        result.problems += [f"chat {c} acked but never done" for c in sorted(acked - state.ended)]
        own_texts = [c for c in sorted(state.ended) if state.sent[c][1] != FUZZ_PROMPT]
        async with httpx.AsyncClient(
            base_url=server.url, timeout=TIMEOUT, headers={"Cookie": client.cookie}
        ) as http:
            for sid in own_texts[:STORED_CHECKS]:
                conversation, text = state.sent[sid]
                answer = "".join(state.answers[sid])
                problem = await check_stored(http, sid, conversation, text, answer)
                result.stored += 1
                if problem:
                    result.problems.append(problem)
    result.problems += extra
    result.problems += [
        f"{n} token/done frames of stream {s!r}, never acked" for s, n in stray.items()
    ]
    return result


async def check_stored(
    http: httpx.AsyncClient, sid: str, conversation: str, text: str, answer: str | None
) -> str | None:
    """The history of `http`'s user holds chat `sid`'s text exactly (NUL and all) and, when
    `answer` is given, the complete answer (stored once its stream ended: polled a moment)."""
    until = time.monotonic() + SETTLE
    while True:
        response = await http.get(f"/api/conversations/{conversation}")
        if response.status_code != 200:
            return f"chat {sid}: conversation {conversation} answered {response.status_code}"
        mine = {m["role"]: m for m in response.json()["messages"] if m["id"] == sid}
        user, assistant = mine.get("user"), mine.get("assistant")
        if user is not None and user["text"] != text:
            return f"chat {sid}: stored text {user['text']!r}, sent {text!r}"
        done = assistant is not None and assistant.get("complete") is True
        if user is not None and (answer is None or done):
            if answer is not None and assistant is not None and assistant["text"] != answer:
                return f"chat {sid}: stored answer {assistant['text'][:80]!r}... not exact"
            return None
        if time.monotonic() > until:
            return f"chat {sid}: not stored in time ({sorted(mine)} of user, assistant)"
        await asyncio.sleep(0.05)


# ---- pinpointing a wrong answer ----------------------------------------------------------------
#
# At speed, a missing answer names only its kind ("one bad_frame with id null too few"). The
# frames that were owed such an answer are sent again, one at a time on a fresh connection,
# each followed by a ping as a fence, so a report names the exact frame and what came back.

PINPOINT_MAX: Final = 400  # frames re-sent per run, at most
PINPOINTABLE: Final = ("error", "pong", "none")  # answers that need no state of the connection


async def pinpoint(server: Server, suspects: list[Fuzzed]) -> list[str]:
    """Re-send each suspect alone; the ones answered otherwise than promised, as problems."""
    candidates = [f for f in suspects if f.expect[0] in PINPOINTABLE][:PINPOINT_MAX]
    # One connection per group of suspects whose promised answers name distinct ids, so an
    # answer with an id has one owner.
    groups: list[list[Fuzzed]] = []
    for fuzzed in candidates:
        named = fuzzed.expect[2] if fuzzed.expect[0] == "error" else None
        for group in groups:
            if named is None or all(f.expect[2:3] != (named,) for f in group):
                group.append(fuzzed)
                break
        else:
            groups.append([fuzzed])
    found: list[str] = []
    for group in groups:
        found += await _pinpoint_group(server, group)
    return found


async def _pinpoint_group(server: Server, group: list[Fuzzed]) -> list[str]:
    """An answer belongs to the suspect whose promised answer names its id (answers from
    log reads may come after the fence, an `ack` after later frames' answers); any other
    answer to the suspect before whose fence it came."""
    owner_of = {f.expect[2]: i for i, f in enumerate(group) if f.expect[0] == "error"}
    owner_of.pop(None, None)
    answers: list[list[dict[str, Any]]] = [[] for _ in group]
    found: list[str] = []

    def take(frame: dict[str, Any], current: int) -> None:
        # Not answers: the heartbeat, and the stream of a chat that an earlier suspect
        # started (that suspect is reported by its `ack`).
        if frame["type"] not in ("ping", "token", "done"):
            answers[owner_of.get(frame.get("id"), current)].append(frame)

    client = await Client.connect(server)
    try:
        for index, fuzzed in enumerate(group):
            fence = 2**53 - index
            await client.ws.send(fuzzed.payload)
            await client.send(type="ping", t=fence)
            async with asyncio.timeout(TIMEOUT):
                while (frame := json.loads(await client.ws.recv())) != {"type": "pong", "t": fence}:
                    take(frame, index)
        with contextlib.suppress(TimeoutError):  # answers that trail the last fence
            async with asyncio.timeout(1.0):
                while True:
                    take(json.loads(await client.ws.recv()), len(group) - 1)
    except (ConnectionClosed, TimeoutError) as exc:
        found.append(f"pinpointing stopped: {exc!r}")
    finally:
        await client.close()
    for fuzzed, got in zip(group, answers, strict=True):
        if not _answers_match(fuzzed.expect, got):
            shown = [{k: v for k, v in a.items() if k not in ("message", "retryable")} for a in got]
            found.append(
                f"pinpointed ({fuzzed.kind}): sent {fuzzed.payload[:400]!r}, promised "
                f"{fuzzed.expect}, answered {shown}"
            )
    return found


def _answers_match(expect: tuple[Any, ...], answers: list[dict[str, Any]]) -> bool:
    if expect[0] == "none":
        return answers == []
    if len(answers) != 1:
        return False
    (answer,) = answers
    if expect[0] == "pong":
        return answer["type"] == "pong" and _key(("pong", answer["t"])) == _key(expect)
    return (answer["type"], answer.get("code"), answer.get("id")) == tuple(expect)


# ---- normal clients ------------------------------------------------------------------------


@dataclass
class NormalResult:
    streams: int = 0
    exact: int = 0
    problems: list[str] = field(default_factory=list)


async def normal_client(
    server: Server, stop: asyncio.Event, ctx: FuzzContext, paragraphs: int, minimum: int = 2
) -> NormalResult:
    """Stream chats one after another until `stop` (at least `minimum`); each answer must be
    the demo model's, exactly. Its stream ids are offered to the fuzzers as others' ids."""
    result = NormalResult()
    client = await Client.connect(server)
    try:
        while result.streams < minimum or not stop.is_set():
            prompt = f"normal {uuid.uuid4().hex[:8]} {result.streams}"
            stream, conversation = uuid.uuid4().hex, uuid.uuid4().hex
            ctx.others.append(stream)
            ctx.first_other.set()
            await client.send(type="chat", id=stream, conversation=conversation, text=prompt)
            view = await client.until_end(stream)
            result.streams += 1
            want = demo_reply(prompt, paragraphs)
            end = view.end or {}
            if (
                view.text == want
                and view.duplicates == 0
                and view.gaps == 0
                and end.get("type") == "done"
                and end.get("reason") == "stop"
            ):
                result.exact += 1
            else:
                result.problems.append(
                    f"stream {stream}: end {end}, {len(view.text)}/{len(want)} chars, "
                    f"{view.duplicates} duplicates, {view.gaps} gaps"
                )
    except (ConnectionClosed, TimeoutError) as exc:
        result.problems.append(f"normal client lost its connection: {exc!r}")
    finally:
        await client.close()
    return result


# ---- HTTP ----------------------------------------------------------------------------------


@dataclass
class HttpResult:
    tried: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    to_read_back: list[tuple[str, str, str]] = field(default_factory=list)
    stored: int = 0  # accepted chats read back from the history and matched


CONTENT_TYPES: Final = [
    None,
    "application/json",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=zz",
    "application/octet-stream",
    "\u00e9/\u00e9",
    "",
]


def _http_body(rng: random.Random, ctx: FuzzContext) -> bytes:
    choice = rng.randrange(7)
    ok = {"id": _id(rng), "conversation": _id(rng), "text": "http fuzz"}
    if choice == 0:
        return rng.randbytes(rng.randint(0, 400))
    if choice == 1:
        return b"x" * (ctx.max_bytes + rng.randint(1, ctx.max_bytes))
    if choice == 2:
        key = rng.choice(list(ok))
        value = rng.choice([None, 5, [], {}, _bad_id(rng), "z" * (ctx.max_text + 1)])
        return json.dumps({**ok, key: value}).encode()
    if choice == 3:
        raw = json.dumps(ok).encode()
        at = rng.randrange(1, len(raw))
        return raw[:at] + rng.choice([b"\xff", b"\xed\xa0\x80", b"\xc3", b"\x00"]) + raw[at:]
    if choice == 4:
        return _junk_text(rng).encode("utf-8", "surrogatepass")
    if choice == 5:
        del ok[rng.choice(list(ok))]
        return json.dumps(ok).encode()
    return json.dumps(ok).encode()


def _header_value(rng: random.Random) -> bytes:
    choice = rng.randrange(6)
    if choice == 0:
        return str(rng.randrange(10 ** rng.randint(1, 25))).encode()
    if choice == 1:
        return rng.choice([b"-1", b"1.5", b"0x10", b"\xb2", b"\xb9\xb2", b"+4", b"1e3"])
    if choice == 2:
        return bytes(rng.choice(range(0x21, 0x7F)) for _ in range(rng.randint(1, 20)))
    if choice == 3:
        return bytes(rng.choice(range(0x80, 0x100)) for _ in range(rng.randint(1, 8)))
    if choice == 4:
        return str(MAX_SEQ + rng.randint(0, 2)).encode()
    return b"0"


async def http_fuzz(
    server: Server, rng: random.Random, ctx: FuzzContext, count: int, deadline: float
) -> HttpResult:
    """Random requests to the API: never a 5xx; every error is an `error` frame's JSON."""
    result = HttpResult()
    own: list[str] = []  # streams this client started: their SSE responses are 200
    # The structured requests' own client: one identity throughout (the random mix forges
    # cookies, which may give its client another), so its chats are known to be its own.
    chats: dict[str, tuple[str, str] | None] = {}
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http,
        httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as structured,
    ):
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            if rng.random() < STRUCTURED_HTTP_SHARE:
                await _structured_request(structured, rng, ctx, chats, result)
                continue
            if rng.random() < 0.08:
                result.tried["ws-upgrade"] += 1
                status, problem = await _ws_upgrade(server, rng)
                result.statuses[status] += 1
                if problem:
                    result.problems.append(f"ws-upgrade: {problem}")
                continue
            kind, request = _http_request(rng, ctx, http, own)
            if rng.random() < 0.25:
                request.headers["Origin"] = _origin(rng, server)
            if rng.random() < 0.15:
                request.headers["Cookie"] = _cookie(rng)
            result.tried[kind] += 1
            try:
                response = await http.send(request, stream=True)
            except httpx.HTTPError as exc:
                result.problems.append(f"{kind}: no answer: {exc!r}")
                continue
            try:
                result.statuses[response.status_code] += 1
                problem = await _check_http(response)
                if kind.startswith("post-chat") and response.status_code in (200, 202):
                    own.append(response.json()["id"])
            finally:
                await response.aclose()
            if problem:
                result.problems.append(f"{kind} {request.method} {request.url}: {problem}")
        for sid, conversation, text in result.to_read_back[:STORED_HTTP_CHECKS]:
            problem = await check_stored(structured, sid, conversation, text, None)
            result.stored += 1
            if problem:
                result.problems.append(f"post-chat: {problem}")
    return result


async def _structured_request(
    http: httpx.AsyncClient,
    rng: random.Random,
    ctx: FuzzContext,
    chats: dict[str, tuple[str, str] | None],
    result: HttpResult,
) -> None:
    fuzzed = _http_structured(rng, ctx, chats)
    result.tried[fuzzed.kind] += 1
    headers = {"Content-Type": "application/json"}
    try:
        response = await http.post(fuzzed.path, content=fuzzed.body, headers=headers)
    except httpx.HTTPError as exc:
        result.problems.append(f"{fuzzed.kind}: no answer: {exc!r}")
        return
    result.statuses[response.status_code] += 1
    problem = await _check_expected(response, fuzzed.expect)
    if problem:
        result.problems.append(f"{fuzzed.kind} POST {fuzzed.path} {fuzzed.body[:300]!r}: {problem}")
    elif fuzzed.stored and response.status_code == 202:
        result.to_read_back.append(fuzzed.stored)


# ---- HTTP by structure ---------------------------------------------------------------------
#
# `POST /api/chat` bodies made like the structured frames (a chat frame without `type`: the
# same `judge`), and `POST /api/streams/<id>/cancel` with such bodies, which it ignores. Each
# request has one answer: the status and error code (and id) the protocol promises.

HTTP_STATUS_OF: Final = {BAD_FRAME: 400, TOO_LARGE: 413, NOT_FOUND: 404, CONFLICT: 409}
STRUCTURED_HTTP_SHARE: Final = 0.4  # of the HTTP requests
STORED_HTTP_CHECKS: Final = 6  # accepted chats with texts of their own, read back per run
PLACEHOLDER: Final = "\ue000"  # in a body's text, replaced by bytes that are no UTF-8
NOT_UTF8: Final = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\x80"]


@dataclass(frozen=True)
class HttpExpect:
    """The one answer a structured request may get: `status`, and for an error its `code`
    and `id`; for an accepted chat its `id` and `conversation`. `either`: a chat id the
    random mix may have used before, with a text unknown here (200 or 409)."""

    status: int
    code: str | None = None
    id: str | None = None
    conversation: str | None = None
    either: bool = False


@dataclass(frozen=True)
class HttpFuzzed:
    kind: str
    path: str
    body: bytes
    expect: HttpExpect
    stored: tuple[str, str, str] | None = None  # (id, conversation, text) to read back


def _body_answer(
    pairs: list[Pair], body: bytes, ctx: FuzzContext, chats: dict[str, tuple[str, str] | None]
) -> tuple[HttpExpect, tuple[str, str, str] | None]:
    verdict = judge(pairs, len(body), ctx.max_bytes, ctx.max_text, body=True)
    if isinstance(verdict, Refused):
        return HttpExpect(HTTP_STATUS_OF[verdict.code], verdict.code, verdict.id), None
    f = verdict.fields
    sid, conversation, text = f["id"], f["conversation"], f["text"]
    if sid in chats:
        before = chats[sid]
        if before is None:
            return HttpExpect(200, id=sid, conversation=conversation, either=True), None
        if before != (conversation, text):
            return HttpExpect(409, CONFLICT, sid), None
        return HttpExpect(200, id=sid, conversation=conversation), None
    chats[sid] = (conversation, text)
    stored = (sid, conversation, text) if text != "http fuzz" else None
    return HttpExpect(202, id=sid, conversation=conversation), stored


def _body_pairs(rng: random.Random, chats: dict[str, tuple[str, str] | None]) -> list[Pair]:
    sid = _fresh_id(rng, set(chats))
    pairs = [
        pair(rng, "id", string_of(rng, sid, 0.05)),
        pair(rng, "conversation", string_of(rng, _id(rng), 0.05)),
        pair(rng, "text", string_of(rng, "http fuzz", 0.05)),
    ]
    rng.shuffle(pairs)
    return pairs


def _replace(pairs: list[Pair], name: str, value: Pair) -> list[Pair]:
    return [p for p in pairs if p[0].value != name] + [value]


def _http_structured(
    rng: random.Random, ctx: FuzzContext, chats: dict[str, tuple[str, str] | None]
) -> HttpFuzzed:
    kind = rng.choice(
        [
            "post-chat-nesting",
            "post-chat-numbers",
            "post-chat-escapes",
            "post-chat-fields",
            "post-cancel-body",
        ]
    )
    if kind == "post-cancel-body":
        return _cancel_with_body(rng, ctx, chats)
    pairs = _body_pairs(rng, chats)
    field_names = ["id", "conversation", "text"]
    raw: bytes | None = None  # a body the generator wrote itself, with its answer
    if kind == "post-chat-nesting":
        form = rng.randrange(4)
        depth = rng.choice([rng.randint(MAX_NESTING - 2, MAX_NESTING + 2), rng.randint(1, 4000)])
        if form == 0:
            raw = b"[" * depth
            code = TOO_LARGE if len(raw) > ctx.max_bytes else BAD_FRAME
            return HttpFuzzed(kind, "/api/chat", raw, HttpExpect(HTTP_STATUS_OF[code], code))
        if form == 1:
            pairs.append(pair(rng, rng.choice(["x", "after", "type"]), nest(rng, depth - 1)))
        elif form == 2:
            pairs = _replace(
                pairs,
                rng.choice(field_names),
                pair(rng, rng.choice(field_names), nest(rng, depth - 1)),
            )
        else:
            pairs.append(pair(rng, "s", string_of(rng, "[" * rng.randint(33, 3000), 0.0)))
    elif kind == "post-chat-numbers":
        if rng.random() < 0.6:
            pairs.append(pair(rng, rng.choice(["n", "after", "type", "t"]), number(rng)))
        else:
            name = rng.choice(field_names)
            pairs = _replace(pairs, name, pair(rng, name, number(rng)))
    elif kind == "post-chat-escapes":
        form = rng.randrange(5)
        if form == 0:  # text with escapes, NUL and astral characters: accepted and stored
            text = random_text(rng, rng.randint(1, 40))
            text = text[:3] + "\x00" + text[3:]
            pairs = _replace(pairs, "text", pair(rng, "text", string_of(rng, text, rng.random())))
        elif form == 1:  # an escape no JSON allows, in any field
            name = rng.choice([*field_names, "x"])
            pairs = _replace(
                pairs, name, pair(rng, name, string_lit(rng, rng.randint(0, 10), bad=True))
            )
        elif form == 2:  # bytes that are no UTF-8, inside the text
            pairs = _replace(pairs, "text", pair(rng, "text", Lit(f'"ab{PLACEHOLDER}cd"', "")))
            raw = obj_src(rng, pairs).encode().replace(PLACEHOLDER.encode(), rng.choice(NOT_UTF8))
        elif form == 3:  # a BOM first, or the body in UTF-16
            encoded = obj_src(rng, pairs).encode(rng.choice(["utf-8-sig", "utf-16", "utf-16-le"]))
            raw = encoded
        else:  # escaped keys and ids (valid), or an id whose escape is no id character
            pairs = [(string_of(rng, k.value, 1.0), v) for k, v in pairs]
            if rng.random() < 0.5:
                name = rng.choice(["id", "conversation"])
                pairs = _replace(
                    pairs,
                    name,
                    pair(
                        rng, name, string_of(rng, _id(rng)[:40] + rng.choice("/\n\x00 \u00e9"), 1.0)
                    ),
                )
        if raw is not None:
            return HttpFuzzed(kind, "/api/chat", raw, HttpExpect(400, BAD_FRAME, None))
    else:  # post-chat-fields
        name = rng.choice(field_names)
        edge = _field_value(rng, ctx, set(chats), name)
        mode = rng.randrange(4)
        if mode == 0:
            pairs = _replace(pairs, name, pair(rng, name, edge))
        elif mode == 1:  # twice: each occurrence checked, the last one counts
            valid = pair(
                rng,
                name,
                _valid_value(rng, ctx, set(chats), name)
                if name != "text"
                else string_of(rng, "http fuzz"),
            )
            pairs = [p for p in pairs if p[0].value != name]
            pairs += (
                [valid, pair(rng, name, edge)]
                if rng.random() < 0.5
                else [pair(rng, name, edge), valid]
            )
        elif mode == 2:
            pairs = [p for p in pairs if p[0].value != name]
        else:  # a repeat of an earlier chat (200), or of its id with another text (409)
            known = [c for c, v in chats.items() if v is not None]
            if known:
                sid = rng.choice(known)
                conversation, text = chats[sid] or ("", "")
                if rng.random() < 0.3:
                    text += "!"
                pairs = [
                    pair(rng, "id", string_of(rng, sid, 0.1)),
                    pair(rng, "conversation", string_of(rng, conversation, 0.1)),
                    pair(rng, "text", string_of(rng, text, 0.1)),
                ]
    rng.shuffle(pairs)
    body = obj_src(rng, pairs).encode()
    expect, stored = _body_answer(pairs, body, ctx, chats)
    return HttpFuzzed(kind, "/api/chat", body, expect, stored)


BAD_PATH_IDS: Final = ["a b", "a" * 65, "\u00e9", "a.b", "a+b", "a:b", "~", "a\n", "%"]


def _cancel_with_body(
    rng: random.Random, ctx: FuzzContext, chats: dict[str, tuple[str, str] | None]
) -> HttpFuzzed:
    """A cancel whose body is junk by structure: ignored, the answer is the path's."""
    body = rng.choice(
        [
            b"",
            b"[" * rng.randint(1, ctx.max_bytes),
            obj_src(rng, [pair(rng, "n", number(rng))]).encode(),
            obj_src(rng, [pair(rng, "s", string_lit(rng, 20, bad=True))]).encode(),
            b'{"id":"' + rng.choice(NOT_UTF8) + b'"}',
            rng.randbytes(rng.randint(1, 200)),
        ]
    )
    choice = rng.randrange(4)
    if choice == 0 and chats:
        sid = rng.choice(list(chats))
        expect = HttpExpect(202)
    elif choice == 1:
        sid = rng.choice(BAD_PATH_IDS)
        expect = HttpExpect(400, BAD_FRAME, None)
    elif choice == 2 and ctx.others:  # another user's stream: not found, as if nobody had it
        sid = rng.choice(ctx.others)
        expect = HttpExpect(404, NOT_FOUND, sid)
    else:
        sid = _fresh_id(rng, set(chats))
        expect = HttpExpect(404, NOT_FOUND, sid)
    return HttpFuzzed(
        "post-cancel-body", f"/api/streams/{quote(sid, safe='')}/cancel", body, expect
    )


async def _check_expected(response: httpx.Response, expect: HttpExpect) -> str | None:
    status = response.status_code
    await response.aread()
    try:
        body = response.json()
    except ValueError:
        return f"answered {status} with a body that is not JSON: {response.content[:200]!r}"
    if status == 429 and expect.status == 202 and body.get("code") == RATE_LIMITED:
        return None  # the limiter may refuse any new chat
    wanted = {200, 409} if expect.either else {expect.status}
    if status not in wanted:
        return f"answered {status} {body!r}, expected {expect.status} {expect.code or ''}"
    if status >= 400:
        code = CONFLICT if expect.either else expect.code
        if body.get("code") != code or body.get("retryable") is not RETRYABLE.get(code):
            return f"answered {status} {body!r}, expected code {code}"
        if not body.get("message"):
            return f"answered {status} without a message: {body!r}"
        if "id" in body and not expect.either and body["id"] != expect.id:
            return f"answered {status} {body!r}, expected id {expect.id!r}"
    elif expect.id is not None:
        want = {
            "id": expect.id,
            "conversation": expect.conversation,
            "stream": f"/api/streams/{expect.id}",
        }
        if body != want:
            return f"answered {status} {body!r}, expected {want!r}"
    return None


def _origin(rng: random.Random, server: Server) -> str:
    return rng.choice(
        [
            server.url,
            f"http://localhost:{server.port}",
            "http://evil.example",
            "null",
            "",
            "http://[::1",
            "http://[zz]",
            "http://a]b",
            "http://127.0.0.1:99999",
            "\u00ff\u00fe",
            "://",
            "http://" + "a" * 300,
        ]
    )


def _cookie(rng: random.Random) -> str:
    return rng.choice(
        [
            "tw=forged.signature",
            "tw=",
            "tw=" + "." * 40,
            "tw=a.b.c; tw=d.e",
            ";;;",
            "=",
            "tw=\u00ff\u00fe.\u00e9",
            "a" * 2000,
            "tw=" + _id(rng) + "." + _id(rng),
        ]
    )


async def _ws_upgrade(server: Server, rng: random.Random) -> tuple[int, str | None]:
    """A WebSocket upgrade with random Origin and Cookie: refused with a 4xx, or accepted
    (then `hello` must come first); never a 5xx."""
    headers = {}
    if rng.random() < 0.7:
        headers["Origin"] = _origin(rng, server)
    if rng.random() < 0.5:
        headers["Cookie"] = _cookie(rng)
    try:
        async with asyncio.timeout(TIMEOUT):
            async with connect(server.ws_url, additional_headers=headers) as ws:
                hello = json.loads(await ws.recv())
                if hello.get("type") != "hello":
                    return 101, f"first frame is not hello: {hello!r}"
                return 101, None
    except InvalidStatus as exc:
        status = exc.response.status_code
        return status, f"{headers}: answered {status}" if status >= 500 else None
    except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake) as exc:
        return 0, f"{headers}: {exc!r}"


METHODS: Final = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]


def _random_path(rng: random.Random, stream: str) -> str:
    junk = quote(_text(rng, rng.randint(0, 12)), safe="")
    return rng.choice(
        [
            "/",
            "/api",
            "/api/",
            "/api/chat",
            "/api/streams",
            f"/api/streams/{stream}/x",
            f"/api/streams/{stream}/cancel/",
            f"/api/conversations/{stream}/{junk}",
            f"/vendor/{junk}",
            f"/{junk}",
            "/%2e%2e/%2e%2e/etc/passwd",
            "/vendor/..%2f..%2fpyproject.toml",
            "/metrics",
            "/healthz",
            "/readyz",
            "/index.html",
            "/ws",
        ]
    )


def _http_request(
    rng: random.Random, ctx: FuzzContext, http: httpx.AsyncClient, own: list[str]
) -> tuple[str, httpx.Request]:
    roll = rng.randrange(6)
    if roll <= 1:
        headers = {}
        content_type = rng.choice(CONTENT_TYPES)
        if content_type is not None:
            headers["Content-Type"] = content_type.encode()
        body = _http_body(rng, ctx)
        if rng.random() < 0.3:  # chunked: no Content-Length, the size is found while reading

            async def chunks(data: bytes = body) -> Any:
                for at in range(0, len(data), 1000):
                    yield data[at : at + 1000]

            return "post-chat-chunked", http.build_request(
                "POST", "/api/chat", content=chunks(), headers=headers
            )
        return "post-chat", http.build_request("POST", "/api/chat", content=body, headers=headers)
    stream = quote(
        rng.choice([_id(rng), _bad_id(rng) or "x", *ctx.others[-3:], *own[-3:]]), safe=""
    )
    if roll == 2:
        headers = {"Last-Event-ID": _header_value(rng)} if rng.random() < 0.6 else {}
        params = {"after": _header_value(rng).decode("latin-1")} if rng.random() < 0.5 else {}
        return "get-stream", http.build_request(
            "GET", f"/api/streams/{stream}", headers=headers, params=params
        )
    if roll == 3:
        return "cancel-stream", http.build_request("POST", f"/api/streams/{stream}/cancel")
    if roll == 4:
        return "get-conversation", http.build_request("GET", f"/api/conversations/{stream}")
    method = rng.choice(METHODS)
    body = rng.randbytes(rng.randint(0, 50)) if method not in ("GET", "HEAD") else b""
    return "random-route", http.build_request(
        method, _random_path(rng, stream), content=body or None
    )


async def _check_http(response: httpx.Response) -> str | None:
    status = response.status_code
    if status >= 500:
        await response.aread()
        return f"answered {status}: {response.content[:200]!r}"
    if response.request.method == "HEAD" or not response.request.url.path.startswith("/api"):
        return None  # PROTOCOL.md's error bodies are the API's; a page may answer in HTML
    if status < 400:
        # An accepted chat's JSON is read; a stream that exists (SSE) is closed unread.
        if response.headers.get("content-type", "").startswith("application/json"):
            await response.aread()
        return None
    await response.aread()
    try:
        body = response.json()
    except ValueError:
        return f"{status} with a body that is not JSON: {response.content[:200]!r}"
    if not (isinstance(body, dict) and body.get("code") in PROTOCOL_CODES):
        return f"{status} with a body that is no error frame: {body!r}"
    if body.get("retryable") is not RETRYABLE[body["code"]] or not body.get("message"):
        return f"{status} with a malformed error frame: {body!r}"
    return None


# ---- the report ----------------------------------------------------------------------------


@dataclass
class RoundStats:
    """One round, read from /metrics once it settled."""

    frames: int
    seconds: float
    rss: float  # process_resident_memory_bytes
    tasks: int  # tokenwire_tasks
    stream_logs: int  # tokenwire_stream_logs (kept stream_ttl after their end: retained)


# RSS, the check for leaks proportional to the fuzz. Python seldom hands memory back to the
# OS, so RSS is compared between rounds of the same size, not with the start: the first
# round (after the warm-up) grows the allocator's pools and caches to what a round needs;
# the last round may grow RSS only by what a round legitimately keeps, which scales with the
# chats it ran (each stream log is kept `stream_ttl`, 10 minutes, and each chat's user,
# conversation and history rows stay), so the allowance is per new stream log, plus slack.
# Measured on this machine (2 cores; 3000 frames and 375 requests: a warm-up and 2 rounds
# of 1350 frames; seeds 1-8, wire and uvicorn): the last round grew RSS 0.7-1.4 MiB while
# adding 60-93 stream logs, at most 21.7 KiB per log (uvicorn; wire at most 16.6), the first
# round at most 1.9 MiB and 21.3 KiB per log; ten rounds in a row grew 0.45-0.95 MiB each,
# no faster late than early. For scale: a plain chat keeps 3-4 KiB, 5000 bad frames on one
# connection keep under 3 bytes each, 500 connections opened and closed keep nothing: the
# rest of a round's growth is not attributed to one cause. Allowed: 24 KiB per new stream
# log plus 1 MiB (a few of obmalloc's 256 KiB arenas, page rounding): 2.4-3.2 MiB for
# such a round. A leak of 1.5 KiB per fuzz frame (2 MiB a round) would have failed every
# run measured.
RSS_PER_STREAM_LOG: Final = 24 * 1024
RSS_SLACK: Final = 1024 * 1024
# tokenwire_tasks must come back to its baseline exactly: the baseline already counts the
# scrape's own request task and the background tasks started on first use (heartbeat
# sweep, lease renewal, ...); every other task ends with its connection, request or stream.
TASK_SLACK: Final = 0
# Places every server counts contained failures at (it may count more: all must be 0).
CONTAINED_PLACES: Final = ("frame", "connection", "http", "loop")
CONTAINED: Final = "tokenwire_contained_failures_total"


@dataclass
class Report:
    seed: int
    seconds: float = 0.0
    tried: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    http_tried: Counter[str] = field(default_factory=Counter)
    http_statuses: Counter[int] = field(default_factory=Counter)
    probes: Counter[str] = field(default_factory=Counter)  # throwaway connections, by kind
    stored: int = 0  # chats whose stored text (and answer) were read back and matched
    normal_streams: int = 0
    normal_exact: int = 0
    connections_dropped: int = 0
    connections_leaked: int = -1  # WebSocket connections and SSE responses still open
    rounds: list[RoundStats] = field(default_factory=list)  # the warm-up first
    tasks_baseline: int = -1
    tasks_leaked: int = -1  # tokenwire_tasks above the baseline after the last round
    contained: dict[str, float] = field(default_factory=dict)  # contained failures, by place
    server_crashes: int = 0
    tracebacks: int = 0
    first_traceback: str = ""
    problems: list[str] = field(default_factory=list)
    suspects: list[Fuzzed] = field(default_factory=list)  # frames pinpointed after the run

    @property
    def rss_growth(self) -> float | None:
        """RSS growth of the last round over the one before (None before two rounds)."""
        if len(self.rounds) < 3:
            return None
        return self.rounds[-1].rss - self.rounds[-2].rss

    @property
    def rss_allowance(self) -> float:
        if len(self.rounds) < 3:
            return 0.0
        logs = max(0, self.rounds[-1].stream_logs - self.rounds[-2].stream_logs)
        return RSS_SLACK + RSS_PER_STREAM_LOG * logs

    @property
    def rss_ok(self) -> bool:
        growth = self.rss_growth
        return growth is None or growth <= self.rss_allowance

    @property
    def ok(self) -> bool:
        return (
            not self.problems
            and self.connections_dropped == 0
            and self.connections_leaked == 0
            and 0 <= self.tasks_leaked <= TASK_SLACK
            and self.rss_ok
            and set(CONTAINED_PLACES) <= set(self.contained)
            and not any(self.contained.values())
            and self.server_crashes == 0
            and self.tracebacks == 0
            and self.normal_exact == self.normal_streams > 0
        )

    def lines(self) -> list[str]:
        total = sum(self.tried.values())
        rate = total / self.seconds if self.seconds else 0.0
        mib = 1024 * 1024
        growth = self.rss_growth
        out = [
            f"seed {self.seed}, {self.seconds:.1f} s",
            f"frames tried: {total} ({rate:,.0f}/s)",
            *(f"  {kind}: {n}" for kind, n in sorted(self.tried.items())),
            f"error frames received: {sum(self.errors.values())}",
            *(f"  {code}: {n}" for code, n in sorted(self.errors.items())),
            f"http requests tried: {sum(self.http_tried.values())}",
            *(f"  {kind}: {n}" for kind, n in sorted(self.http_tried.items())),
            "http statuses: "
            + ", ".join(f"{s}: {n}" for s, n in sorted(self.http_statuses.items())),
            f"throwaway connections: {sum(self.probes.values())}",
            *(f"  {kind}: {n}" for kind, n in sorted(self.probes.items())),
            f"chats read back from the history: {self.stored}",
            f"normal streams exact: {self.normal_exact} of {self.normal_streams}",
            f"fuzz connections dropped: {self.connections_dropped}",
            f"connections leaked: {self.connections_leaked}",
            *(
                f"  {'warm-up' if i == 0 else f'round {i}'}: {r.frames} frames in "
                f"{r.seconds:.1f} s; then RSS {r.rss / mib:.1f} MiB, {r.tasks} tasks, "
                f"{r.stream_logs} stream logs"
                for i, r in enumerate(self.rounds)
            ),
            f"tasks above the baseline ({self.tasks_baseline}): {self.tasks_leaked}",
            "RSS growth of the last round: "
            + (
                "not measured (fewer than 2 rounds)"
                if growth is None
                else f"{growth / mib:+.2f} MiB (allowed {self.rss_allowance / mib:.2f} MiB)"
            ),
            "contained failures: "
            + (", ".join(f"{p}: {n:g}" for p, n in self.contained.items()) or "not in /metrics"),
            f"server crashes: {self.server_crashes}",
            f"tracebacks in the server log: {self.tracebacks}",
            *([f"  first: {self.first_traceback}"] if self.first_traceback else []),
            f"problems: {len(self.problems)}",
            *(f"  {p}" for p in self.problems[:30]),
            "RESULT: " + ("ok" if self.ok else "FAILED"),
        ]
        return out


def gauge(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(f"/metrics has no {name}")


def open_connections(server: Server) -> float:
    return gauge(server, "tokenwire_connections") + gauge(server, "tokenwire_sse_responses")


# ---- throwaway connections: text that is no UTF-8 ---------------------------------------------
#
# The websockets client cannot send a text message that is no UTF-8, so these write raw,
# masked frames on its transport (nothing else is being sent then). RFC 6455 (8.1) requires
# failing such a connection: close 1007, preceded at most by one `error` bad_frame with id
# null. And a character split across two fragments of a text message is valid UTF-8: it must
# be answered as usual.

NOT_UTF8_SEQUENCES: Final = [
    b"\xff",
    b"\xfe",
    b"\x80",  # a continuation byte alone
    b"\xc3",  # a sequence cut short
    b"\xe2\x82",
    b"\xc0\xaf",  # overlong
    b"\xe0\x80\xaf",
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\xed\xa0\xbd\xed\xb8\x80",  # CESU-8
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\xf8\x88\x80\x80\x80",  # five bytes
]
PROBES_PER_ROUND: Final = 8
OP_TEXT: Final = 0x1
OP_CONTINUATION: Final = 0x0


def client_frame(rng: random.Random, opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One masked client frame (RFC 6455, 5.2)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 2**16:
        head += bytes([0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + size.to_bytes(8, "big")
    mask = rng.randbytes(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def utf8_probe(server: Server, rng: random.Random) -> tuple[str, str | None]:
    """One throwaway connection: a text message holding bytes that are no UTF-8 (whole or in
    its second fragment), or a valid one split inside a character. Returns its kind and a
    problem, if any."""
    t = rng.randrange(2**40)
    good = json.dumps({"type": "ping", "t": t, "x": "\u00e9\u20ac\U0001f600"}, ensure_ascii=False)
    raw = good.encode()
    split = rng.random() < 0.3
    if split:
        kind = "split-utf8"
        at = raw.index("\u20ac".encode()) + rng.randint(1, 2)  # inside the 3-byte character
        frames = [raw[:at], raw[at:]]
    else:
        kind = "invalid-utf8"
        bad = rng.choice(NOT_UTF8_SEQUENCES)
        at = rng.choice([0, raw.index(b'"x"'), len(raw) - 2, len(raw)])
        payload = raw[:at] + bad + raw[at:]
        cut = rng.randint(1, len(payload) - 1) if rng.random() < 0.3 else len(payload)
        frames = [payload[:cut], payload[cut:]] if cut < len(payload) else [payload]
    data = b"".join(
        client_frame(rng, OP_TEXT if i == 0 else OP_CONTINUATION, part, fin=i == len(frames) - 1)
        for i, part in enumerate(frames)
    )
    try:
        client = await Client.connect(server)
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        return kind, f"{kind}: could not connect: {exc!r}"
    seen: list[dict[str, Any]] = []
    try:
        client.ws.transport.write(data)
        async with asyncio.timeout(TIMEOUT):
            while True:
                frame = json.loads(await client.ws.recv())
                if frame["type"] == "ping":
                    continue  # the heartbeat
                seen.append(frame)
                if split and frame == {"type": "pong", "t": t}:
                    return kind, None
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd else None
        if split:
            return kind, f"{kind} {data[:80]!r}: closed with {code} after {seen}"
        errors_ok = len(seen) <= 1 and all(
            f.get("type") == "error" and f.get("code") == BAD_FRAME and f.get("id") is None
            for f in seen
        )
        if code != 1007 or not errors_ok:
            return kind, f"{kind} {payload[:80]!r}: closed with {code} after {seen}"
        return kind, None
    except TimeoutError:
        return kind, f"{kind} {data[:80]!r}: neither answered nor closed, after {seen}"
    finally:
        await client.close()


# ---- the whole run ---------------------------------------------------------------------------


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


async def run_live(
    server: Server,
    *,
    frames: int,
    seconds: float,
    connections: int = 4,
    http_requests: int = 300,
    seed: int = 1,
    paragraphs: int = 1,
    rounds: int = 2,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Fuzz `server` (started with `SERVER_SETTINGS`) with `frames` WebSocket frames and
    `http_requests` HTTP requests, all within `seconds`: a warm-up of a tenth of them, then
    `rounds` equal rounds. In each, the frames are spread over `connections` connections at
    a time, opened one batch after another so fresh connections keep coming, two normal
    clients stream, and a few throwaway connections send text that is no UTF-8.

    After each round the server must settle: its connections and tasks back to their
    baselines (taken after the warm-up); RSS may grow in the last round only by what that
    round legitimately keeps. At the end no contained failure may have been counted."""
    report = Report(seed=seed)
    rng = random.Random(seed)
    ctx = FuzzContext(
        max_bytes=int(server.env["TOKENWIRE_MAX_FRAME_BYTES"]),
        max_text=int(server.env["TOKENWIRE_MAX_TEXT_CHARS"]),
        answer=demo_tokens(FUZZ_PROMPT, paragraphs),
        paragraphs=paragraphs,
    )
    baseline = open_connections(server)
    log_start = len(server.log())
    started = time.monotonic()
    deadline = started + seconds
    warm_frames = frames // 10 if rounds > 0 else frames
    warm_http = http_requests // 10 if rounds > 0 else http_requests
    shares = list(
        zip(
            [warm_frames, *_split(frames - warm_frames, rounds)],
            [warm_http, *_split(http_requests - warm_http, rounds)],
            strict=True,
        )
    )
    for index, (round_frames, round_http) in enumerate(shares):
        round_started = time.monotonic()
        await _round(
            server,
            report,
            ctx,
            random.Random(rng.randrange(2**32)),
            frames=round_frames,
            http_requests=round_http,
            connections=connections,
            deadline=deadline,
            progress=progress,
        )
        if index == 0 and server.proc.poll() is None:
            report.problems += await _first_uses(server)
        if server.proc.poll() is not None:
            report.server_crashes = 1
            break
        stats = await _settle(server, baseline, report.tasks_baseline if index else None)
        stats.frames, stats.seconds = round_frames, time.monotonic() - round_started
        report.rounds.append(stats)
        if index == 0:
            report.tasks_baseline = stats.tasks
        if progress:
            progress(f"round {index} done: {stats}")
    report.seconds = time.monotonic() - started

    if server.proc.poll() is not None:
        report.server_crashes = 1
    else:
        report.connections_leaked = int(open_connections(server) - baseline)
        last = report.rounds[-1]
        report.tasks_leaked = last.tasks - report.tasks_baseline
        prefix = CONTAINED + '{place="'
        for name, value in server.metrics().items():
            if name.startswith(prefix) and name.endswith('"}'):
                report.contained[name[len(prefix) : -2]] = value
        if missing := set(CONTAINED_PLACES) - set(report.contained):
            report.problems.append(f"/metrics has no {CONTAINED} for {sorted(missing)}")
        if report.suspects:  # first: they name the frames
            report.problems[:0] = await pinpoint(server, report.suspects)
    log = server.log()[log_start:]
    report.tracebacks = log.count("Traceback")
    if report.tracebacks:
        at = log.index("Traceback")
        head = log.rfind("\n", 0, log.rfind("\n", 0, at))  # from the line before it
        report.first_traceback = " | ".join(
            line.strip() for line in log[head + 1 :].splitlines()[:12] if line.strip()
        )[:600]
    return report


async def _first_uses(server: Server) -> list[str]:
    """Start what a server process starts once, on first use, before the task baseline is
    taken: the hub's sweeps, and sse_starlette's shutdown watcher (one per event loop, from
    the first SSE response on). A chat over HTTP, its stream read to the end over SSE."""
    body = {"id": uuid.uuid4().hex, "conversation": uuid.uuid4().hex, "text": "warm-up"}
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        response = await http.post("/api/chat", json=body)
        if response.status_code != 202:
            return [f"warm-up chat answered {response.status_code}: {response.text[:200]}"]
        async with http.stream("GET", f"/api/streams/{body['id']}") as events:
            async for line in events.aiter_lines():
                if line == "event: done":
                    break
    return []


async def _settle(server: Server, connections: float, tasks: int | None) -> RoundStats:
    """Wait (at most SETTLE) until the round's connections, streams and, given a baseline,
    tasks are gone; then read the round's figures. Without a baseline (the warm-up), the
    tasks are read a few times once the rest has settled, and the fewest count."""
    until = time.monotonic() + SETTLE
    while True:
        m = server.metrics()
        open_now = m["tokenwire_connections"] + m["tokenwire_sse_responses"]
        quiet = open_now <= connections and m["tokenwire_streams_active"] == 0
        if quiet and (tasks is None or m["tokenwire_tasks"] <= tasks + TASK_SLACK):
            break
        if time.monotonic() > until:
            break
        await asyncio.sleep(0.05)
    task_count = int(m["tokenwire_tasks"])
    if tasks is None:
        for _ in range(5):
            await asyncio.sleep(0.05)
            task_count = min(task_count, int(server.metrics()["tokenwire_tasks"]))
    return RoundStats(
        frames=0,
        seconds=0.0,
        rss=m["process_resident_memory_bytes"],
        tasks=task_count,
        stream_logs=int(m["tokenwire_stream_logs"]),
    )


async def _round(
    server: Server,
    report: Report,
    ctx: FuzzContext,
    rng: random.Random,
    *,
    frames: int,
    http_requests: int,
    connections: int,
    deadline: float,
    progress: Callable[[str], None] | None,
) -> None:
    """One round: fuzz lanes, HTTP fuzz and throwaway connections while two normal clients
    stream; its results are added to `report`."""
    stop = asyncio.Event()
    paragraphs = ctx.paragraphs
    normals = [asyncio.create_task(normal_client(server, stop, ctx, paragraphs)) for _ in range(2)]
    # The fuzzers wait for a first stream id of the normal clients (to send its id).
    await asyncio.wait_for(ctx.first_other.wait(), TIMEOUT)
    per_connection = max(1, min(2000, frames // connections))

    async def fuzz_lane(lane_seed: int, budget: int) -> list[ConnectionResult]:
        lane_rng = random.Random(lane_seed)
        results = []
        while budget > 0 and time.monotonic() < deadline:
            count = min(per_connection, budget)
            results.append(await fuzz_connection(server, lane_rng, ctx, count, deadline))
            budget -= count
            if progress:
                progress(f"lane {lane_seed}: {budget} frames to go")
        return results

    async def probes(probe_rng: random.Random) -> list[tuple[str, str | None]]:
        found = []
        for _ in range(PROBES_PER_ROUND):
            if time.monotonic() > deadline:
                break
            found.append(await utf8_probe(server, probe_rng))
        return found

    lanes = [
        asyncio.create_task(fuzz_lane(rng.randrange(2**32), budget))
        for budget in _split(frames, connections)
    ]
    http_task = asyncio.create_task(
        http_fuzz(server, random.Random(rng.randrange(2**32)), ctx, http_requests, deadline)
    )
    probe_task = asyncio.create_task(probes(random.Random(rng.randrange(2**32))))
    lane_results = await asyncio.gather(*lanes)
    http = await http_task
    probed = await probe_task
    stop.set()
    normal_results = await asyncio.gather(*normals)

    for results in lane_results:
        for r in results:
            report.tried.update(r.tried)
            report.errors.update(r.errors)
            report.connections_dropped += r.dropped
            report.problems += r.problems
            report.stored += r.stored
            report.suspects += r.suspects
    report.http_tried.update(http.tried)
    report.http_statuses.update(http.statuses)
    report.problems += http.problems
    report.stored += http.stored
    for kind, problem in probed:
        report.probes[kind] += 1
        if problem:
            report.problems.append(problem)
    for n in normal_results:
        report.normal_streams += n.streams
        report.normal_exact += n.exact
        report.problems += n.problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100_000, help="WebSocket frames to send")
    parser.add_argument("--seconds", type=float, default=60.0, help="time bound of the run")
    parser.add_argument("--connections", type=int, default=8, help="fuzz connections at once")
    parser.add_argument("--http", type=int, default=3000, help="HTTP requests to send")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds after the warm-up (RSS compares the last two)"
    )
    parser.add_argument(
        "--websocket-server",
        choices=["wire", "uvicorn"],
        default="wire",
        help="the server's WebSocket protocol (TOKENWIRE_WEBSOCKET_SERVER)",
    )
    parser.add_argument(
        "--redis", action="store_true", help="run the server on Redis (a redis-server it starts)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tokenwire-fuzz-") as tmp, ExitStack() as stack:
        settings = {**SERVER_SETTINGS, "websocket_server": args.websocket_server}
        if args.redis:
            redis = start_redis(Path(tmp))
            stack.callback(redis.stop)
            settings["redis_url"] = redis.url
        server = start_server(Path(tmp), **settings)
        try:
            report = asyncio.run(
                run_live(
                    server,
                    frames=args.frames,
                    seconds=args.seconds,
                    connections=args.connections,
                    http_requests=args.http,
                    seed=args.seed,
                    paragraphs=int(SERVER_SETTINGS["demo_paragraphs"]),
                    rounds=args.rounds,
                )
            )
        finally:
            server.stop()
        if not report.ok:
            print(server.log()[-4000:], file=sys.stderr)
    print(f"backend: {'redis' if args.redis else 'memory'}, websocket: {args.websocket_server}")
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
