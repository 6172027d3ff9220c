"""The frame codec: every client frame either decodes to exactly one struct or is refused with
the error frame PROTOCOL.md promises; every server frame survives encode and decode."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from backend.protocol import (
    BAD_FRAME,
    CONFLICT,
    MAX_NESTING,
    NOT_FOUND,
    OVERLOADED,
    PROTOCOL_VERSION,
    PROVIDER_ERROR,
    RATE_LIMITED,
    SHUTTING_DOWN,
    STREAM_EXPIRED,
    TOO_LARGE,
    UNAUTHORIZED,
    AckFrame,
    CancelFrame,
    ChatFrame,
    ClientFrame,
    DoneFrame,
    ErrorFrame,
    HelloFrame,
    MessageFrame,
    PingFrame,
    PongFrame,
    ProtocolError,
    ResumeFrame,
    ServerFrame,
    TokenFrame,
    decode_client_frame,
    decode_server_frame,
    encode,
    encode_text,
    error_frame,
)

MAX_BYTES = 1024
MAX_TEXT = 100
ID64 = "a" * 64


@dataclass(frozen=True)
class Refused:
    """The error frame a refused client frame must produce; `says` is part of its message."""

    code: str
    id: str | None
    retryable: bool
    says: str


def at_size(size: int) -> str:
    """A valid ping of exactly `size` bytes (an ignored field pads it)."""
    bare = frame(type="ping", t=1, pad="")
    return frame(type="ping", t=1, pad="p" * (size - len(bare)))


def frame(**fields: Any) -> str:
    return json.dumps(fields)


def chat(**overrides: Any) -> str:
    return frame(**{"type": "chat", "id": "r1", "conversation": "c1", "text": "hi", **overrides})


def without(raw: str, key: str) -> str:
    fields = json.loads(raw)
    del fields[key]
    return json.dumps(fields)


def bad(says: str, id: str | None = None) -> Refused:
    return Refused(BAD_FRAME, id, False, says)


# Identifiers outside [A-Za-z0-9_-]{1,64}.
BAD_IDS = [
    pytest.param("", id="empty"),
    pytest.param("a" * 65, id="65-chars"),
    pytest.param("a b", id="space"),
    pytest.param("caf\u00e9", id="unicode"),
    pytest.param("\uff21", id="fullwidth-letter"),
    pytest.param("a/b", id="slash"),
    pytest.param("a.b", id="dot"),
    pytest.param("abc\n", id="trailing-newline"),
    pytest.param(ID64 + "\n", id="64-chars-and-newline"),
    pytest.param("\nabc", id="leading-newline"),
]

CASES = [
    # ---- accepted ------------------------------------------------------------------------
    pytest.param(chat(), ChatFrame(id="r1", conversation="c1", text="hi"), id="chat"),
    pytest.param(
        chat(after=7), ChatFrame(id="r1", conversation="c1", text="hi", after=7), id="chat-after"
    ),
    pytest.param(
        chat(text="x" * MAX_TEXT),
        ChatFrame(id="r1", conversation="c1", text="x" * MAX_TEXT),
        id="chat-text-at-limit",
    ),
    pytest.param(
        chat(id=ID64, conversation="A-z_09"),
        ChatFrame(id=ID64, conversation="A-z_09", text="hi"),
        id="chat-id-64-chars",
    ),
    pytest.param(
        chat(text="<script>\u00e9\U0001f600"),
        ChatFrame(id="r1", conversation="c1", text="<script>\u00e9\U0001f600"),
        id="chat-any-text",
    ),
    pytest.param(
        frame(type="resume", id="r1", after=0), ResumeFrame(id="r1", after=0), id="resume-0"
    ),
    pytest.param(
        frame(type="resume", id="r1", after=42), ResumeFrame(id="r1", after=42), id="resume-42"
    ),
    pytest.param(frame(type="cancel", id="r1"), CancelFrame(id="r1"), id="cancel"),
    pytest.param(frame(type="ping", t=1700000000123), PingFrame(t=1700000000123), id="ping-int"),
    pytest.param(frame(type="ping", t=1.5), PingFrame(t=1.5), id="ping-float"),
    pytest.param(frame(type="pong", t=7), PongFrame(t=7), id="pong-int"),
    pytest.param(frame(type="pong", t=2.0), PongFrame(t=2.0), id="pong-float"),
    pytest.param(
        frame(type="cancel", id="r1", extra={"x": [1]}, more="y"),
        CancelFrame(id="r1"),
        id="unknown-fields-ignored",
    ),
    pytest.param(
        frame(type="ping", t=1, id="not checked here"),
        PingFrame(t=1),
        id="unknown-id-field-on-ping-ignored",
    ),
    # ---- not a JSON object -----------------------------------------------------------------
    pytest.param("hello", bad("not a JSON object"), id="not-json"),
    pytest.param("", bad("not a JSON object"), id="empty-message"),
    pytest.param('{"type": "chat", "id": "r1"', bad("not a JSON object"), id="truncated-json"),
    pytest.param('[{"type": "cancel", "id": "r1"}]', bad("object"), id="json-array"),
    pytest.param("5", bad("object"), id="json-number"),
    pytest.param('"cancel"', bad("object"), id="json-string"),
    pytest.param("null", bad("object"), id="json-null"),
    # ---- type ----------------------------------------------------------------------------
    pytest.param(
        frame(type="subscribe", id="r1"),
        bad("unknown frame `type`; expected one of chat, resume, cancel, ping, pong", "r1"),
        id="unknown-type",
    ),
    pytest.param(frame(type="Chat", id="r1"), bad("unknown frame `type`", "r1"), id="type-case"),
    pytest.param(frame(type=5, id="r1"), bad("`$.type`", "r1"), id="type-not-a-string"),
    pytest.param(frame(id="r1", text="hi"), bad("frame has no `type`", "r1"), id="missing-type"),
    pytest.param(frame(), bad("frame has no `type`"), id="empty-object"),
    # ---- missing fields --------------------------------------------------------------------
    pytest.param(without(chat(), "text"), bad("`text`", "r1"), id="chat-missing-text"),
    pytest.param(
        without(chat(), "conversation"), bad("`conversation`", "r1"), id="chat-missing-conversation"
    ),
    pytest.param(without(chat(), "id"), bad("`id`"), id="chat-missing-id"),
    pytest.param(frame(type="resume", id="r1"), bad("`after`", "r1"), id="resume-missing-after"),
    pytest.param(frame(type="cancel"), bad("`id`"), id="cancel-missing-id"),
    pytest.param(frame(type="ping"), bad("`t`"), id="ping-missing-t"),
    pytest.param(frame(type="pong"), bad("`t`"), id="pong-missing-t"),
    # ---- wrong types -----------------------------------------------------------------------
    pytest.param(chat(text=5), bad("`$.text`", "r1"), id="text-number"),
    pytest.param(chat(text=None), bad("`$.text`", "r1"), id="text-null"),
    pytest.param(chat(after="3"), bad("`$.after`", "r1"), id="after-string"),
    pytest.param(chat(after=-1), bad("`$.after`", "r1"), id="after-negative"),
    pytest.param(chat(after=1.5), bad("`$.after`", "r1"), id="after-float"),
    pytest.param(
        frame(type="resume", id="r1", after=-3), bad("`$.after`", "r1"), id="resume-after-negative"
    ),
    pytest.param(
        frame(type="resume", id="r1", after="0"), bad("`$.after`", "r1"), id="resume-after-string"
    ),
    pytest.param(frame(type="ping", t="1"), bad("`$.t`"), id="ping-t-string"),
    pytest.param(frame(type="ping", t=True), bad("`$.t`"), id="ping-t-bool"),
    pytest.param(frame(type="pong", t=None), bad("`$.t`"), id="pong-t-null"),
    # ---- identifiers: an invalid id is never echoed, a valid one always is -----------------
    *[pytest.param(chat(id=p.values[0]), bad("`$.id`"), id=f"id-{p.id}") for p in BAD_IDS],
    *[
        pytest.param(
            chat(conversation=p.values[0]), bad("`$.conversation`", "r1"), id=f"conv-{p.id}"
        )
        for p in BAD_IDS
    ],
    pytest.param(chat(id=12), bad("`$.id`"), id="id-number"),
    pytest.param(chat(id=["r1"]), bad("`$.id`"), id="id-list"),
    pytest.param(frame(type="cancel", id="a b"), bad("`$.id`"), id="cancel-id-space"),
    pytest.param(frame(type="resume", id="a/b", after=1), bad("`$.id`"), id="resume-id-slash"),
    # ---- limits ----------------------------------------------------------------------------
    pytest.param(
        chat(text="x" * MAX_BYTES),
        Refused(TOO_LARGE, None, False, f"{MAX_BYTES} bytes"),
        id="frame-over-max-bytes",
    ),
    pytest.param(
        # An ignored field of 340 three-byte characters: about 1,080 bytes of UTF-8 on the
        # wire (a WebSocket text message is UTF-8), in fewer than 400 characters.
        json.dumps({"type": "cancel", "id": "r1", "pad": "\u20ac" * 340}, ensure_ascii=False),
        Refused(TOO_LARGE, None, False, f"{MAX_BYTES} bytes"),
        id="frame-over-max-bytes-in-utf8",
    ),
    pytest.param(
        chat(text="x" * (MAX_TEXT + 1)),
        Refused(TOO_LARGE, "r1", False, f"{MAX_TEXT} characters"),
        id="text-over-max-text",
    ),
    pytest.param(at_size(MAX_BYTES - 1), PingFrame(t=1), id="frame-one-byte-under-max-bytes"),
    pytest.param(at_size(MAX_BYTES), PingFrame(t=1), id="frame-at-max-bytes"),
    pytest.param(
        at_size(MAX_BYTES + 1),
        Refused(TOO_LARGE, None, False, f"{MAX_BYTES} bytes"),
        id="frame-one-byte-over-max-bytes",
    ),
    # ---- nesting: refused before any decoder recurses (it once raised RecursionError) ------
    pytest.param("[" * 900, bad(f"deeper than {MAX_NESTING}"), id="nested-arrays"),
    pytest.param('{"a":' * 200, bad(f"deeper than {MAX_NESTING}"), id="nested-objects"),
    pytest.param(
        '{"type":"cancel","id":"r1","x":' + "[" * 100 + "]" * 100 + "}",
        bad(f"deeper than {MAX_NESTING}"),
        id="nested-in-an-unknown-field",
    ),
    pytest.param(
        '{"type":"cancel","id":"r1","x":' + "[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1) + "}",
        CancelFrame(id="r1"),
        id="nested-to-the-limit-in-an-unknown-field",
    ),
    pytest.param(
        '{"type":"cancel","x":' + "[" * MAX_NESTING + "]" * MAX_NESTING + ',"id":"r1"}',
        bad(f"deeper than {MAX_NESTING}"),
        id="nested-one-past-the-limit",
    ),
    pytest.param(
        chat(text="[{" * 45),
        ChatFrame(id="r1", conversation="c1", text="[{" * 45),
        id="brackets-in-a-string-are-text",
    ),
    pytest.param(
        r'{"type":"cancel","id":"r1","x":"\\","y":' + "[" * 40 + "]" * 40 + "}",
        bad(f"deeper than {MAX_NESTING}"),
        id="nested-after-an-escaped-backslash",
    ),
    # ---- numbers ---------------------------------------------------------------------------
    pytest.param('{"type":"ping","t":1e999999}', bad("`$.t`"), id="t-beyond-a-double"),
    pytest.param('{"type":"ping","t":-1e999999}', bad("`$.t`"), id="t-beyond-a-double-negative"),
    pytest.param(frame(type="ping", t=2**53), PingFrame(t=2**53), id="t-largest-exact-int"),
    pytest.param(frame(type="ping", t=2**53 + 1), bad("`$.t`"), id="t-beyond-an-exact-int"),
    pytest.param(frame(type="pong", t=2**64), bad("`$.t`"), id="t-2-to-the-64"),
    pytest.param(frame(type="ping", t=-(2**70)), bad("`$.t`"), id="t-minus-2-to-the-70"),
    pytest.param('{"type":"ping","t":1' + "0" * 400 + "}", bad("`$.t`"), id="t-400-digits"),
    pytest.param('{"type":"ping","t":-0}', PingFrame(t=0), id="t-minus-zero"),
    pytest.param('{"type":"ping","t":1e308}', PingFrame(t=1e308), id="t-largest-double"),
    pytest.param('{"type":"ping","t":NaN}', bad("not a JSON object"), id="t-nan"),
    pytest.param('{"type":"ping","t":Infinity}', bad("not a JSON object"), id="t-infinity"),
    pytest.param(
        frame(type="resume", id="r1", after=2**64), bad("`$.after`", "r1"), id="after-2-to-the-64"
    ),
    pytest.param(
        '{"type":"resume","id":"r1","after":-0}',
        ResumeFrame(id="r1", after=0),
        id="after-minus-zero",
    ),
    pytest.param(
        '{"type":"resume","id":"r1","after":1e999999}', bad("`$.after`", "r1"), id="after-1e999999"
    ),
    # ---- encodings and escapes -------------------------------------------------------------
    pytest.param("\ufeff" + frame(type="ping", t=1), bad("not a JSON object"), id="bom"),
    pytest.param(
        chat(text="\x00"), ChatFrame(id="r1", conversation="c1", text="\x00"), id="nul-escaped"
    ),
    pytest.param(
        '{"type":"chat","id":"r1","conversation":"c1","text":"a\x00b"}',
        bad("not a JSON object"),
        id="nul-raw-in-a-string",
    ),
    pytest.param(
        '{"type":"chat","id":"r1","conversation":"c1","text":"\\ud800"}',
        bad("not a JSON object"),
        id="escaped-lone-surrogate",
    ),
    pytest.param(
        '{"type":"chat","id":"r1","conversation":"c1","text":"\\udfff\\ud800"}',
        bad("not a JSON object"),
        id="escaped-surrogates-in-the-wrong-order",
    ),
    pytest.param(
        '{"type":"chat","id":"r1","conversation":"c1","text":"\\ud83d\\ude00"}',
        ChatFrame(id="r1", conversation="c1", text="\U0001f600"),
        id="escaped-surrogate-pair",
    ),
    # ---- duplicate keys: each occurrence is checked, the last one counts -------------------
    pytest.param(
        '{"type":"cancel","id":"r1","id":"r2"}', CancelFrame(id="r2"), id="duplicate-key-last"
    ),
    pytest.param(
        '{"type":"cancel","id":"a b","id":"r2"}', bad("`$.id`", "r2"), id="duplicate-key-bad-first"
    ),
    pytest.param('{"type":"cancel","type":"ping","t":1}', bad("`type`"), id="duplicate-type"),
    pytest.param(
        '{"type":"cancel","id":"r1","type":"cancel"}', bad("`type`", "r1"), id="same-type-twice"
    ),
    pytest.param(
        '{"t\\u0079p\\u0065":"ping","t":1,"type":"ping"}', bad("`type`"), id="same-type-escaped"
    ),
    pytest.param(
        '{"type":"chat","id":"r1","conversation":"c1","text":"\\"type\\" \\"t\\\\u0079pe\\""}',
        ChatFrame(id="r1", conversation="c1", text='"type" "t\\u0079pe"'),
        id="type-in-a-string-twice",
    ),
    pytest.param(
        '{"type":"cancel","id":"r1","TYPE":"x"}', CancelFrame(id="r1"), id="type-in-capitals"
    ),
]


def decode(raw: str | bytes) -> ClientFrame:
    return decode_client_frame(raw, max_bytes=MAX_BYTES, max_text=MAX_TEXT)


@pytest.mark.parametrize("as_bytes", [False, True], ids=["str", "bytes"])
@pytest.mark.parametrize(("raw", "expected"), CASES)
def test_decode_client_frame(raw: str, expected: ClientFrame | Refused, as_bytes: bool) -> None:
    data: str | bytes = raw.encode() if as_bytes else raw
    if isinstance(expected, Refused):
        try:
            accepted = decode(data)
        except ProtocolError as exc:
            error = exc.frame
            assert str(exc) == error.message
        else:
            pytest.fail(f"accepted as {accepted!r}, expected {expected}")
        assert (error.code, error.id, error.retryable) == (
            expected.code,
            expected.id,
            expected.retryable,
        )
        assert expected.says in error.message
        assert error.retry_after is None
    else:
        decoded = decode(data)
        assert decoded == expected
        assert type(decoded) is type(expected)


def test_a_repeated_type_is_found_around_a_number_of_any_length() -> None:
    # Python's int() refuses over 4300 digits; an unknown field may hold any number.
    raw = '{"type":"ping","t":1,"x":' + "9" * 5000 + ',"type":"ping"}'
    with pytest.raises(ProtocolError, match="`type`") as caught:
        decode_client_frame(raw, max_bytes=65536, max_text=MAX_TEXT)
    assert (caught.value.frame.code, caught.value.frame.id) == ("bad_frame", None)


@pytest.mark.parametrize(
    ("raw", "echo"),
    [
        pytest.param(frame(type="ping", t=1700000000123), b'"t":1700000000123}', id="int"),
        pytest.param(frame(type="ping", t=2.0), b'"t":2.0}', id="whole-float"),
        pytest.param(frame(type="ping", t=0.25), b'"t":0.25}', id="float"),
    ],
)
def test_ping_t_keeps_its_json_type_when_echoed(raw: str, echo: bytes) -> None:
    ping = decode(raw)
    assert isinstance(ping, PingFrame)
    assert type(ping.t) is type(json.loads(raw)["t"])
    assert encode(PongFrame(t=ping.t)).endswith(echo)


# Wrong-typed or invalid values that a careless error message would reflect back to the
# browser (and into any page that shows it).
MARK = "<script>"
REFLECTED = [
    pytest.param(chat(after=MARK), id="after"),
    pytest.param(chat(text=[MARK]), id="text-list"),
    pytest.param(chat(text={MARK: MARK}), id="text-object"),
    pytest.param(chat(id=MARK), id="id"),
    pytest.param(chat(conversation=MARK), id="conversation"),
    pytest.param(frame(type=MARK, id="r1"), id="type"),
    pytest.param(frame(type=[MARK]), id="type-list"),
    pytest.param(frame(type="resume", id="r1", after=MARK), id="resume-after"),
    pytest.param(frame(type="ping", t=MARK), id="ping-t"),
    pytest.param(frame(**{MARK: MARK}), id="no-type"),
    pytest.param(MARK, id="not-json"),
    pytest.param(json.dumps([MARK]), id="array"),
    pytest.param(json.dumps(MARK), id="string"),
    pytest.param(chat(text=MARK * 200), id="too-large"),
]


@pytest.mark.parametrize("raw", REFLECTED)
def test_error_never_contains_the_offending_value(raw: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(raw)
    assert MARK not in caught.value.frame.message
    assert MARK.encode() not in encode(caught.value.frame)


# ---- server frames ---------------------------------------------------------------------------

SERVER_FRAMES = [
    pytest.param(
        HelloFrame(session="s1", node="node-1", heartbeat=30.0, heartbeat_timeout=10.0),
        {
            "type": "hello",
            "session": "s1",
            "node": "node-1",
            "heartbeat": 30.0,
            "heartbeat_timeout": 10.0,
            "protocol": 1,
        },
        id="hello",
    ),
    pytest.param(
        AckFrame(id="r1", conversation="c1"),
        {"type": "ack", "id": "r1", "conversation": "c1"},
        id="ack",
    ),
    pytest.param(
        MessageFrame(id="r1", conversation="c1", text="hi \u00e9"),
        {"type": "message", "id": "r1", "conversation": "c1", "text": "hi \u00e9"},
        id="message",
    ),
    pytest.param(
        TokenFrame(id="r1", seq=1, data="Hel"),
        {"type": "token", "id": "r1", "seq": 1, "data": "Hel"},
        id="token-n-1-omitted",
    ),
    pytest.param(
        TokenFrame(id="r1", seq=9, data="lo"),
        {"type": "token", "id": "r1", "seq": 9, "data": "lo"},
        id="token-n-default-omitted",
    ),
    pytest.param(
        TokenFrame(id="r1", seq=4, data="Hello", n=3),
        {"type": "token", "id": "r1", "seq": 4, "data": "Hello", "n": 3},
        id="token-n-3",
    ),
    pytest.param(
        TokenFrame(id="r1", seq=4, data="", n=0),
        {"type": "token", "id": "r1", "seq": 4, "data": "", "n": 0},
        id="token-n-0",
    ),
    *[
        pytest.param(
            DoneFrame(id="r1", seq=12, reason=reason),
            {"type": "done", "id": "r1", "seq": 12, "reason": reason},
            id=f"done-{reason}",
        )
        for reason in ("stop", "length", "cancelled")
    ],
    pytest.param(
        ErrorFrame(id=None, code=BAD_FRAME, message="frame has no `type`", retryable=False),
        {
            "type": "error",
            "id": None,
            "code": BAD_FRAME,
            "message": "frame has no `type`",
            "retryable": False,
        },
        id="error-of-connection-id-null",
    ),
    pytest.param(
        ErrorFrame(id="r1", code=PROVIDER_ERROR, message="the model failed", retryable=True),
        {
            "type": "error",
            "id": "r1",
            "code": PROVIDER_ERROR,
            "message": "the model failed",
            "retryable": True,
        },
        id="error-of-stream",
    ),
    pytest.param(
        ErrorFrame(
            id="r1", code=RATE_LIMITED, message="slow down", retryable=True, retry_after=2.5
        ),
        {
            "type": "error",
            "id": "r1",
            "code": RATE_LIMITED,
            "message": "slow down",
            "retryable": True,
            "retry_after": 2.5,
        },
        id="error-retry-after",
    ),
    pytest.param(PingFrame(t=1700000000123), {"type": "ping", "t": 1700000000123}, id="ping-int"),
    pytest.param(PingFrame(t=0.5), {"type": "ping", "t": 0.5}, id="ping-float"),
    pytest.param(PongFrame(t=3), {"type": "pong", "t": 3}, id="pong-int"),
    pytest.param(PongFrame(t=3.0), {"type": "pong", "t": 3.0}, id="pong-float"),
]


@pytest.mark.parametrize(("sent", "wire"), SERVER_FRAMES)
def test_server_frame_round_trip(sent: ServerFrame, wire: dict[str, Any]) -> None:
    data = encode(sent)
    assert json.loads(data) == wire
    assert encode_text(sent) == data.decode()
    received = decode_server_frame(data)
    assert received == sent
    assert type(received) is type(sent)
    assert decode_server_frame(data.decode()) == sent
    if isinstance(sent, PingFrame | PongFrame):
        assert isinstance(received, PingFrame | PongFrame)
        assert type(received.t) is type(sent.t)


def test_hello_carries_the_protocol_version() -> None:
    hello = decode_server_frame(
        encode(HelloFrame(session="s", node="n", heartbeat=1.0, heartbeat_timeout=1.0))
    )
    assert isinstance(hello, HelloFrame)
    assert hello.protocol == PROTOCOL_VERSION == 1


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        pytest.param(BAD_FRAME, False, id=BAD_FRAME),
        pytest.param(TOO_LARGE, False, id=TOO_LARGE),
        pytest.param(CONFLICT, False, id=CONFLICT),
        pytest.param(NOT_FOUND, False, id=NOT_FOUND),
        pytest.param(UNAUTHORIZED, False, id=UNAUTHORIZED),
        pytest.param(RATE_LIMITED, True, id=RATE_LIMITED),
        pytest.param(STREAM_EXPIRED, False, id=STREAM_EXPIRED),
        pytest.param(PROVIDER_ERROR, True, id=PROVIDER_ERROR),
        pytest.param(OVERLOADED, True, id=OVERLOADED),
        pytest.param(SHUTTING_DOWN, True, id=SHUTTING_DOWN),
    ],
)
def test_error_frame_for_every_code(code: str, retryable: bool) -> None:
    sent = error_frame(code, "why", "r1")
    assert sent == ErrorFrame(id="r1", code=code, message="why", retryable=retryable)
    assert json.loads(encode(sent)) == {
        "type": "error",
        "id": "r1",
        "code": code,
        "message": "why",
        "retryable": retryable,
    }
    assert decode_server_frame(encode(sent)) == sent


def test_error_frame_without_id_encodes_null_and_with_retry_after_keeps_it() -> None:
    assert json.loads(encode(error_frame(OVERLOADED, "busy")))["id"] is None
    limited = error_frame(RATE_LIMITED, "slow down", retry_after=3.0)
    assert json.loads(encode(limited)) == {
        "type": "error",
        "id": None,
        "code": RATE_LIMITED,
        "message": "slow down",
        "retryable": True,
        "retry_after": 3.0,
    }
