"""Live fuzz of a running tokenwire: random and malformed frames at speed on `/ws`, random
requests to the HTTP API, while normal clients stream chats.

`python -m bench.fuzz [--frames 100000] [--seconds 60] [--redis]` starts its own server
(loopback, a free port; with `--redis` on a redis-server it starts too) and prints what it
tried and what it found; it exits 1 if anything failed. `tests/test_fuzz_live.py` runs the
same fuzz at CI scale. Everything is bounded: a number of frames and requests, and a
deadline in seconds, whichever comes first.

What is checked, per PROTOCOL.md ("bad input never closes a healthy connection ... the
server answers `error` and carries on"):

- every fuzz frame gets exactly the answer the protocol promises: one `error` frame with
  the right code (and id, where the frame had a valid one) for each bad frame, one `pong`
  per `ping`, one `ack` (or `rate_limited`) per new `chat`; and nothing else;
- every fuzz connection stays open and usable (a final `ping` gets its `pong`);
- the normal clients' texts are exactly the demo model's answers, once, in order; so are
  the fuzz connections' own chats, and every replay of them (a `resume` from a random
  point, the end and beyond included);
- every HTTP answer is 2xx or 4xx (never 5xx), errors in the `error` frame's JSON shape;
- afterwards the server runs, `tokenwire_connections` and `tokenwire_sse_responses` are
  back to their baselines (no connection leaked), and its log holds no traceback.

Frames are made by a seeded `random.Random`, so a run is reproducible from its seed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
    MAX_SEQ,
    NOT_FOUND,
    RATE_LIMITED,
    RETRYABLE,
    STREAM_EXPIRED,
    TOO_LARGE,
)
from backend.providers import demo_reply, demo_tokens
from tests.harness import TIMEOUT, Client, Server, StreamView, start_server
from tests.redis_server import start_redis

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


@dataclass
class OwnStreams:
    """The streams one fuzz connection started: `chats` sent, `ended` seen done, `finished`
    ended and not being replayed now (a replay is sent only for those)."""

    chats: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)
    finished: list[str] = field(default_factory=list)


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
            used.update((sid, f"chat:{sid}"))
            own.chats.add(sid)
            frame = {"type": "chat", "id": sid, "conversation": _id(rng), "text": FUZZ_PROMPT}
            return Fuzzed("chat", json.dumps(frame), ("chat", sid))
    if roll < 0.89 and own.finished:
        # Replay an own finished stream from anywhere, its end and beyond included.
        sid = own.finished.pop(rng.randrange(len(own.finished)))
        after = rng.randint(0, len(ctx.answer) + 3)
        frame = {"type": "resume", "id": sid, "after": after}
        return Fuzzed("resume-own", json.dumps(frame), ("replay", sid, after))
    if roll < 0.95:
        t: int | float = rng.choice([rng.randrange(-(2**53), 2**53), rng.uniform(-1e9, 1e9)])
        extra = {"extra": _text(rng, 5)} if rng.random() < 0.3 else {}
        return Fuzzed("ping", json.dumps({"type": "ping", "t": t, **extra}), ("pong", t))
    return Fuzzed("pong", json.dumps({"type": "pong", "t": rng.randrange(2**40)}), ("none",))


# ---- one fuzz connection -------------------------------------------------------------------


@dataclass
class ConnectionResult:
    tried: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # error frames received, by code
    problems: list[str] = field(default_factory=list)
    dropped: bool = False


def _key(expect: tuple[Any, ...]) -> str:
    return json.dumps(expect)


@dataclass
class Replay:
    """A resume of one of this connection's finished streams: what it must deliver."""

    after: int
    want: str  # the answer's text after `after`
    text: str = ""
    last: int = 0


async def fuzz_connection(
    server: Server, rng: random.Random, ctx: FuzzContext, count: int, deadline: float
) -> ConnectionResult:
    """Send up to `count` fuzz frames (until `deadline`) on one new connection, reading
    concurrently; then check every answer, and that a final ping is answered. The
    connection's own chats must stream the demo answer exactly, and so must every replay of
    them (a `resume` from a random point once one has ended)."""
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
    client = await Client.connect(server)
    ws = client.ws
    final_t = rng.randrange(2**52, 2**53)
    answer = "".join(ctx.answer)

    def on_stream_frame(frame: dict[str, Any]) -> None:
        sid, kind = frame["id"], frame["type"]
        replay = replays.get(sid)
        if replay is None:  # the chat's own stream
            view = views.setdefault(sid, StreamView())
            view.apply(frame)
            if kind == "done":
                if (
                    view.text != answer
                    or view.duplicates
                    or view.gaps
                    or frame["seq"] != len(ctx.answer)
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
            if replay.text == replay.want and frame["seq"] == len(ctx.answer):
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
            elif kind in ("token", "done") and frame["id"] in acked:
                on_stream_frame(frame)
            else:
                extra.append(f"unexpected frame {message[:200]}")

    reader = asyncio.create_task(read())
    try:
        for sent in range(count):
            if time.monotonic() > deadline or reader.done():
                break
            fuzzed = make_frame(rng, ctx, used, state)
            result.tried[fuzzed.kind] += 1
            if fuzzed.expect[0] == "replay":
                _, sid, after = fuzzed.expect
                replays[sid] = Replay(after, "".join(ctx.answer[after:]), last=after)
                expected[_key(("replay", sid))] += 1
            elif fuzzed.expect[0] != "none":
                expected[_key(fuzzed.expect)] += 1
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
    if not result.dropped:
        result.problems += [f"chat {c} acked but never done" for c in sorted(acked - state.ended)]
    result.problems += extra
    return result


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
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        for _ in range(count):
            if time.monotonic() > deadline:
                break
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
    return result


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


# ---- the whole run ---------------------------------------------------------------------------


@dataclass
class Report:
    seed: int
    seconds: float = 0.0
    tried: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    http_tried: Counter[str] = field(default_factory=Counter)
    http_statuses: Counter[int] = field(default_factory=Counter)
    normal_streams: int = 0
    normal_exact: int = 0
    connections_dropped: int = 0
    connections_leaked: int = -1  # WebSocket connections and SSE responses still open
    server_crashes: int = 0
    tracebacks: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            not self.problems
            and self.connections_dropped == 0
            and self.connections_leaked == 0
            and self.server_crashes == 0
            and self.tracebacks == 0
            and self.normal_exact == self.normal_streams > 0
        )

    def lines(self) -> list[str]:
        total = sum(self.tried.values())
        rate = total / self.seconds if self.seconds else 0.0
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
            f"normal streams exact: {self.normal_exact} of {self.normal_streams}",
            f"fuzz connections dropped: {self.connections_dropped}",
            f"connections leaked: {self.connections_leaked}",
            f"server crashes: {self.server_crashes}",
            f"tracebacks in the server log: {self.tracebacks}",
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


async def run_live(
    server: Server,
    *,
    frames: int,
    seconds: float,
    connections: int = 4,
    http_requests: int = 300,
    seed: int = 1,
    paragraphs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Fuzz `server` (started with `SERVER_SETTINGS`) with `frames` WebSocket frames spread
    over `connections` connections, opened one batch after another so fresh connections keep
    coming (`connections` at a time), and `http_requests` HTTP requests, while two normal
    clients stream; all within `seconds`."""
    report = Report(seed=seed)
    rng = random.Random(seed)
    ctx = FuzzContext(
        max_bytes=int(server.env["TOKENWIRE_MAX_FRAME_BYTES"]),
        max_text=int(server.env["TOKENWIRE_MAX_TEXT_CHARS"]),
        answer=demo_tokens(FUZZ_PROMPT, paragraphs),
    )
    baseline = open_connections(server)
    log_start = len(server.log())
    started = time.monotonic()
    deadline = started + seconds
    stop = asyncio.Event()
    normals = [asyncio.create_task(normal_client(server, stop, ctx, paragraphs)) for _ in range(2)]
    # The fuzzers wait for a first stream id of the normal clients (to send its id).
    await asyncio.wait_for(ctx.first_other.wait(), TIMEOUT)
    per_connection = max(1, min(2000, frames // connections))
    remaining = frames

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

    budgets = [remaining // connections + (i < remaining % connections) for i in range(connections)]
    lanes = [asyncio.create_task(fuzz_lane(rng.randrange(2**32), budget)) for budget in budgets]
    http_task = asyncio.create_task(
        http_fuzz(server, random.Random(rng.randrange(2**32)), ctx, http_requests, deadline)
    )
    lane_results = await asyncio.gather(*lanes)
    http = await http_task
    stop.set()
    normal_results = await asyncio.gather(*normals)
    report.seconds = time.monotonic() - started

    for results in lane_results:
        for r in results:
            report.tried.update(r.tried)
            report.errors.update(r.errors)
            report.connections_dropped += r.dropped
            report.problems += r.problems
    report.http_tried, report.http_statuses = http.tried, http.statuses
    report.problems += http.problems
    for n in normal_results:
        report.normal_streams += n.streams
        report.normal_exact += n.exact
        report.problems += n.problems

    if server.proc.poll() is not None:
        report.server_crashes = 1
    else:
        # Closed connections leave the hub when their tasks have ended: allow a moment.
        leak_deadline = time.monotonic() + SETTLE
        while True:
            leaked = open_connections(server) - baseline
            if leaked <= 0 or time.monotonic() > leak_deadline:
                break
            await asyncio.sleep(0.05)
        report.connections_leaked = int(leaked)
    log = server.log()[log_start:]
    report.tracebacks = log.count("Traceback")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100_000, help="WebSocket frames to send")
    parser.add_argument("--seconds", type=float, default=60.0, help="time bound of the run")
    parser.add_argument("--connections", type=int, default=8, help="fuzz connections at once")
    parser.add_argument("--http", type=int, default=3000, help="HTTP requests to send")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--redis", action="store_true", help="run the server on Redis (a redis-server it starts)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tokenwire-fuzz-") as tmp, ExitStack() as stack:
        settings = dict(SERVER_SETTINGS)
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
                )
            )
        finally:
            server.stop()
        if not report.ok:
            print(server.log()[-4000:], file=sys.stderr)
    print(f"backend: {'redis' if args.redis else 'memory'}")
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
