"""Property-based tests (hypothesis) of everything that parses client input: the frame
decoder, the body of `POST /api/chat`, and the SSE encoding of server frames.

The decoder is checked against a small reference model written here from PROTOCOL.md
(`expected`): for any frame, the decoder returns exactly the frame the model builds, or
raises `ProtocolError` with the code and id the model predicts, and never anything else.
Runs are derandomized, so CI sees the same examples every time.
"""

from __future__ import annotations

import json
import math
import re
import string
from typing import Any, Final

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from backend.protocol import (
    BAD_FRAME,
    HTTP_STATUS,
    MAX_EXACT_INT,
    MAX_NESTING,
    MAX_SEQ,
    RETRYABLE,
    TOO_LARGE,
    AckFrame,
    CancelFrame,
    ChatFrame,
    ChatRequest,
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
    decode_chat_request,
    decode_client_frame,
    decode_server_frame,
    encode,
    error_frame,
)
from backend.transports.sse import frame_event
from tests.support.properties import fuzz
from tests.support.sse_client import SseParser

MAX_BYTES: Final = 2048
MAX_TEXT: Final = 300
ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
PROTOCOL_CODES: Final = frozenset(RETRYABLE)


# ---- strategies ------------------------------------------------------------------------

# Characters that break naive parsers: NUL, controls, line separators of every kind (SSE
# and str.splitlines disagree on them), RTL overrides, BOM, emoji and a ZWJ sequence.
TRICKY = [
    "\x00",
    "\x1b",
    "\x7f",
    "\r",
    "\n",
    "\r\n",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x85",
    "\u2028",
    "\u2029",
    "\u202e",
    "\u200f",
    "\ufeff",
    "\ufffd",
    "\U0001f600",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467",
    "data: x",
    "\n\nevent: done\ndata: {}\n\n",
    ": comment",
    "id: 7",
    '"',
    "\\",
    "\\u0000",
    "</script>",
]
LONE_SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)

tricky_text = st.lists(st.one_of(st.sampled_from(TRICKY), st.text(max_size=8)), max_size=12).map(
    "".join
)
texts = st.one_of(st.text(max_size=MAX_TEXT), tricky_text)
ids = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=64)
seqs = st.one_of(st.integers(0, 1000), st.integers(0, MAX_SEQ), st.just(MAX_SEQ))
# `t` is echoed, so it must survive the round trip exactly: JSON numbers that JavaScript
# holds without loss (integers up to 2**53, finite doubles).
times = st.one_of(
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
)

client_frames: st.SearchStrategy[ClientFrame] = st.one_of(
    st.builds(ChatFrame, id=ids, conversation=ids, text=texts, after=seqs),
    st.builds(ResumeFrame, id=ids, after=seqs),
    st.builds(CancelFrame, id=ids),
    st.builds(PingFrame, t=times),
    st.builds(PongFrame, t=times),
)

server_frames: st.SearchStrategy[ServerFrame] = st.one_of(
    st.builds(
        HelloFrame,
        session=st.text(),
        node=st.text(),
        heartbeat=st.floats(0, 1e6),
        heartbeat_timeout=st.floats(0, 1e6),
    ),
    st.builds(AckFrame, id=ids, conversation=ids),
    st.builds(MessageFrame, id=ids, conversation=ids, text=texts),
    st.builds(TokenFrame, id=ids, seq=st.integers(1, MAX_SEQ), data=texts, n=st.integers(1, 1000)),
    st.builds(
        DoneFrame,
        id=ids,
        seq=st.integers(0, MAX_SEQ),
        reason=st.sampled_from(["stop", "length", "cancelled"]),
    ),
    st.builds(
        lambda code, message, id, retry_after: error_frame(code, message, id, retry_after),
        code=st.sampled_from(sorted(PROTOCOL_CODES)),
        message=texts,
        id=st.none() | ids,
        retry_after=st.none() | st.floats(0, 1e6),
    ),
    st.builds(PingFrame, t=times),
    st.builds(PongFrame, t=times),
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

# Values that are wrong for some field of some frame, and those that are right.
bad_ids = st.one_of(
    st.just(""),
    st.text(string.ascii_letters, min_size=65, max_size=80),
    st.text(min_size=1, max_size=10).filter(lambda s: not ID_RE.fullmatch(s)),
    st.sampled_from(["a\n", "a b", "caf\u00e9", "\U0001f600", "a\x00", "\u202eabc"]),
)
field_values = st.one_of(
    json_values,
    ids,
    bad_ids,
    st.integers(-(2**70), 2**70),
    st.sampled_from([-1, MAX_SEQ, MAX_SEQ + 1, 2**63, 2**64, -(2**63), 1.0, 0.0, True]),
    st.text(min_size=MAX_TEXT - 2, max_size=MAX_TEXT + 3),
    st.tuples(texts, LONE_SURROGATES, texts).map("".join),
)
field_names = st.sampled_from(["type", "id", "conversation", "text", "after", "t", "extra", ""])


# ---- the reference model ---------------------------------------------------------------

FIELDS: Final[dict[str, dict[str, tuple[str, bool]]]] = {
    # type -> field -> (kind, required)
    "chat": {"id": ("id", True), "conversation": ("id", True), "text": ("str", True)}
    | {"after": ("seq", False)},
    "resume": {"id": ("id", True), "after": ("seq", True)},
    "cancel": {"id": ("id", True)},
    "ping": {"t": ("number", True)},
    "pong": {"t": ("number", True)},
}
STRUCTS: Final[dict[str, type[Any]]] = {
    "chat": ChatFrame,
    "resume": ResumeFrame,
    "cancel": CancelFrame,
    "ping": PingFrame,
    "pong": PongFrame,
}


def valid(kind: str, value: Any) -> bool:
    if kind == "id":
        return isinstance(value, str) and ID_RE.fullmatch(value) is not None
    if kind == "str":
        return isinstance(value, str)
    if kind == "seq":
        return type(value) is int and 0 <= value <= MAX_SEQ
    # A number JavaScript holds exactly (it is echoed); JSON true/false are not numbers.
    if type(value) is int:
        return abs(value) <= MAX_EXACT_INT
    return type(value) is float and math.isfinite(value)


def depth(value: Any) -> int:
    """How deep arrays and objects nest in `value` (an object or array alone is 1)."""
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


def has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list):
        return any(has_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(has_surrogate(k) or has_surrogate(v) for k, v in value.items())
    return False


def error_id(value: Any) -> str | None:
    frame_id = value.get("id") if isinstance(value, dict) else None
    return frame_id if valid("id", frame_id) else None


def expected(
    value: Any, size: int, raw_bytes: bool = False
) -> ClientFrame | tuple[str, str | None, list[str]]:
    """What PROTOCOL.md says a client frame decodes to: the frame, or (code, error id,
    fields the message may name). `size` is the frame's length in bytes.

    A lone surrogate is no Unicode: as a `\\ud800` escape, or anywhere in a str, the frame
    is refused. `raw_bytes`: it came as the bytes a surrogate would have in UTF-8, which
    are no UTF-8: refused where the decoder reads them, but unknown fields are skipped
    unread, so there they change nothing (beyond the error id: none can be read back)."""
    if size > MAX_BYTES:
        return (TOO_LARGE, None, [])
    if depth(value) > MAX_NESTING:
        return (BAD_FRAME, None, ["nests"])
    surrogate = has_surrogate(value)
    if (surrogate and not raw_bytes) or not isinstance(value, dict):
        return (BAD_FRAME, None, [])
    fid = None if surrogate else error_id(value)
    spec = FIELDS.get(value["type"]) if isinstance(value.get("type"), str) else None
    read = [value.get("type"), *(value[f] for f in spec or () if f in value)]
    if has_surrogate(read):
        return (BAD_FRAME, None, [])
    if spec is None:
        return (BAD_FRAME, fid, ["type"])
    wrong = [
        name
        for name, (kind, required) in spec.items()
        if (name in value and not valid(kind, value[name])) or (required and name not in value)
    ]
    if wrong:
        return (BAD_FRAME, fid, wrong)
    frame = STRUCTS[value["type"]](**{name: value[name] for name in spec if name in value})
    if isinstance(frame, ChatFrame) and len(frame.text) > MAX_TEXT:
        return (TOO_LARGE, frame.id, ["text"])
    return frame


def outcome(data: str | bytes) -> ClientFrame | ErrorFrame:
    """Decode; a refusal must be a well-formed error frame with a PROTOCOL.md code."""
    try:
        return decode_client_frame(data, max_bytes=MAX_BYTES, max_text=MAX_TEXT)
    except ProtocolError as exc:
        check_error(exc.frame)
        return exc.frame


def check_error(frame: ErrorFrame) -> None:
    assert isinstance(frame, ErrorFrame)
    assert frame.code in PROTOCOL_CODES
    assert frame.retryable is RETRYABLE[frame.code]
    assert frame.message
    assert frame.id is None or ID_RE.fullmatch(frame.id)
    # The answer must itself be a frame a client can read back.
    assert decode_server_frame(encode(frame)) == frame


def names_a_field(message: str, fields: list[str]) -> bool:
    if fields == ["nests"]:
        return f"deeper than {MAX_NESTING}" in message
    return any(f"`{f}`" in message or f"`$.{f}`" in message for f in fields)


def check_against_model(value: Any, ascii_only: bool, as_bytes: bool) -> None:
    data = serialise(value, ascii_only, as_bytes)
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    # Surrogates written raw into bytes, not as escapes: see `expected`.
    want = expected(value, size, raw_bytes=as_bytes and not ascii_only)
    got = outcome(data)
    if isinstance(want, tuple):
        code, error_id_, fields = want
        assert isinstance(got, ErrorFrame), f"accepted {got!r}, model says {want}"
        assert (got.code, got.id) == (code, error_id_), got
        if fields:
            assert names_a_field(got.message, fields), (got.message, fields)
    else:
        assert got == want


def serialise(value: Any, ascii_only: bool, as_bytes: bool) -> str | bytes:
    text = json.dumps(value, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass") if as_bytes else text


# ---- (a) junk --------------------------------------------------------------------------


@fuzz(400)
@given(data=st.one_of(st.binary(max_size=3000), st.text(max_size=3000)))
def test_junk_is_refused_as_bad_frame_or_too_large(data: str | bytes) -> None:
    got = outcome(data)
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    if size > MAX_BYTES:
        assert isinstance(got, ErrorFrame) and got.code == TOO_LARGE
    elif isinstance(got, ErrorFrame):
        assert got.code in (BAD_FRAME, TOO_LARGE)


@fuzz(200)
@given(
    data=st.one_of(
        st.lists(st.one_of(LONE_SURROGATES, st.sampled_from(TRICKY)), min_size=1).map("".join),
        st.builds(
            lambda s, pos: json.dumps({"type": "chat", "id": "r1", "conversation": "c"})[:pos] + s,
            LONE_SURROGATES,
            st.integers(0, 50),
        ),
        st.builds(lambda n: "\ud800" * n, st.integers(MAX_BYTES // 4, MAX_BYTES)),
    ),
    as_bytes=st.booleans(),
)
def test_text_that_is_not_unicode_is_refused(data: str, as_bytes: bool) -> None:
    raw: str | bytes = data.encode("utf-8", "surrogatepass") if as_bytes else data
    got = outcome(raw)
    assert isinstance(got, ErrorFrame) and got.code in (BAD_FRAME, TOO_LARGE)


def test_regression_lone_surrogate_str_is_bad_frame_not_unicode_error() -> None:
    # Found by fuzzing: a str holding a lone surrogate raised UnicodeEncodeError (from the
    # size check when long, from msgspec when short) instead of ProtocolError.
    for data in ["\ud800" * MAX_BYTES, '{"type":"cancel","id":"\udc00"}']:
        got = outcome(data)
        assert isinstance(got, ErrorFrame)
    assert outcome("\ud800" * MAX_BYTES).code == TOO_LARGE  # type: ignore[union-attr]
    assert outcome('{"type":"cancel","id":"\udc00"}').code == BAD_FRAME  # type: ignore[union-attr]


INVALID_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]


@fuzz(300)
@given(
    value=st.one_of(
        client_frames.map(msgspec.to_builtins),
        st.fixed_dictionaries({"id": ids, "conversation": ids, "text": texts}),
    ),
    bad=st.sampled_from(INVALID_UTF8),
    which=st.integers(0, 100),
    where=st.integers(0, 100),
)
def test_bytes_that_are_not_utf8_inside_a_string_are_bad_frame(
    value: dict[str, Any], bad: bytes, which: int, where: int
) -> None:
    # JSON whose structure is fine but one string of a field the decoder reads holds bytes
    # that are no UTF-8: what an HTTP body may carry. (Unknown fields are skipped unread,
    # so their bytes are not checked; nothing of them is kept either.)
    fields = [k for k, v in value.items() if isinstance(v, str)]
    if not fields:
        return
    name = fields[which % len(fields)]
    text = value[name]
    cut = where % (len(text) + 1)
    value[name] = text[:cut] + "\x00MARK\x00" + text[cut:]
    raw = json.dumps(value).encode().replace(b"\\u0000MARK\\u0000", bad, 1)
    assert bad in raw
    got = outcome(raw if "type" in value else b'{"type":"chat",' + raw[1:])
    assert isinstance(got, ErrorFrame) and got.code == BAD_FRAME
    if name != "type":
        chat = chat_outcome(raw)
        assert isinstance(chat, ErrorFrame) and chat.code == BAD_FRAME


def test_regression_invalid_utf8_body_is_bad_frame_not_unicode_error() -> None:
    # Found by fuzzing: msgspec raises UnicodeDecodeError (not DecodeError) for a string
    # that is not UTF-8, and POST /api/chat answered 500.
    for raw in [
        b'{"id":"a","conversation":"b","text":"\xff"}',
        b'{"id":5,"conversation":"b","text":"\xed\xa0\x80"}',
        b'{"id":5,"x":"\xff"}',
    ]:
        got = chat_outcome(raw)
        assert isinstance(got, ErrorFrame) and got.code == BAD_FRAME, raw
        frame = outcome(b'{"type":"chat",' + raw[1:])
        assert isinstance(frame, ErrorFrame) and frame.code == BAD_FRAME, raw


# ---- (b) JSON of the wrong shape ---------------------------------------------------------


@fuzz(400)
@given(value=json_values, ascii_only=st.booleans(), as_bytes=st.booleans())
def test_any_json_value_matches_the_model(value: Any, ascii_only: bool, as_bytes: bool) -> None:
    check_against_model(value, ascii_only, as_bytes)


@fuzz(300)
@given(
    frame_type=st.one_of(st.sampled_from(sorted(FIELDS)), st.text(max_size=10), json_values),
    body=st.dictionaries(field_names, field_values, max_size=6),
    as_bytes=st.booleans(),
)
def test_objects_with_any_type_and_fields_match_the_model(
    frame_type: Any, body: dict[str, Any], as_bytes: bool
) -> None:
    value = {"type": frame_type, **body}
    check_against_model(value, True, as_bytes)


# ---- (c) valid frames with one or more fields mutated -------------------------------------


def as_dict(frame: ClientFrame) -> dict[str, Any]:
    value: dict[str, Any] = msgspec.to_builtins(frame)
    return value


mutations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), field_names, field_values),
        st.tuples(st.just("delete"), field_names, st.none()),
        st.tuples(st.just("set"), st.text(max_size=12), json_values),  # extra fields
    ),
    min_size=1,
    max_size=3,
)


@fuzz(400)
@given(
    frame=client_frames,
    changes=mutations,
    ascii_only=st.booleans(),
    as_bytes=st.booleans(),
)
def test_mutated_frames_match_the_model(
    frame: ClientFrame, changes: list[tuple[str, str, Any]], ascii_only: bool, as_bytes: bool
) -> None:
    value = as_dict(frame)
    for action, name, new in changes:
        if action == "set":
            value[name] = new
        else:
            value.pop(name, None)
    check_against_model(value, ascii_only, as_bytes)


@fuzz(100)
@given(frame=client_frames, pad=st.integers(1, 3 * MAX_BYTES), as_bytes=st.booleans())
def test_frames_over_the_byte_limit_are_too_large(
    frame: ClientFrame, pad: int, as_bytes: bool
) -> None:
    value = {**as_dict(frame), "padding": "x" * (MAX_BYTES + pad)}
    got = outcome(serialise(value, True, as_bytes))
    assert isinstance(got, ErrorFrame) and (got.code, got.id) == (TOO_LARGE, None)


@fuzz(300)
@given(
    text=st.text(min_size=MAX_BYTES // 8, max_size=MAX_BYTES // 2),
    pad=st.integers(0, 4),
)
def test_str_and_bytes_of_one_frame_decode_alike_near_the_byte_limit(text: str, pad: int) -> None:
    # The limit is in UTF-8 bytes, whichever form the frame arrives in: a str of multi-byte
    # characters counts its bytes, not its characters.
    data = json.dumps({"type": "cancel", "id": "r", "x": text + "a" * pad}, ensure_ascii=False)
    as_str, as_bytes = outcome(data), outcome(data.encode())
    assert as_str == as_bytes
    over = len(data.encode()) > MAX_BYTES
    assert isinstance(as_str, ErrorFrame) is over
    assert not over or as_str.code == TOO_LARGE  # type: ignore[union-attr]


def test_seq_bound_is_javascripts_largest_exact_integer() -> None:
    # Found by fuzzing: `after` had no upper bound, and 10**32 reached the Redis stream
    # log, whose XRANGE refused the id; the error was taken for an outage and the resume
    # was never answered.
    assert outcome(json.dumps({"type": "resume", "id": "r", "after": MAX_SEQ})) == ResumeFrame(
        id="r", after=MAX_SEQ
    )
    for after in (MAX_SEQ + 1, 10**32):
        got = outcome(json.dumps({"type": "resume", "id": "r", "after": after}))
        assert isinstance(got, ErrorFrame) and (got.code, got.id) == (BAD_FRAME, "r")
        assert "`$.after`" in got.message


# ---- (e) by structure: nesting, numbers, escapes and encodings, in every field ----------
#
# Frames written as text, piece by piece, where a JSON library would never write them; the
# model judges the text as Python's strict JSON reader parses it (msgspec and it agree on
# JSON; where they may not, NaN and Infinity, which JSON lacks, count as malformed).

FRAME_FIELDS: Final = [(t, f) for t, spec in FIELDS.items() for f in [*spec, "extra"]]


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_text_against_model(text: str, as_bytes: bool) -> None:
    """`text` decodes as the model says of the value Python's JSON reader makes of it."""
    data: str | bytes = text.encode("utf-8", "surrogatepass") if as_bytes else text
    size = len(text.encode("utf-8", "surrogatepass"))
    got = outcome(data)
    if size <= MAX_BYTES and _nesting_of_text(text) > MAX_NESTING:
        assert isinstance(got, ErrorFrame), f"accepted {got!r}: nests too deep"
        assert (got.code, got.id) == (BAD_FRAME, None), got
        assert names_a_field(got.message, ["nests"]), got.message
        return
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except ValueError:  # no JSON at all (RecursionError cannot happen: nesting is bounded)
        want: Any = (TOO_LARGE if size > MAX_BYTES else BAD_FRAME, None, [])
    else:
        want = expected(value, size, raw_bytes=False)
    if isinstance(want, tuple):
        code, error_id_, fields = want
        assert isinstance(got, ErrorFrame), f"accepted {got!r}, model says {want}"
        assert (got.code, got.id) == (code, error_id_), (got, want)
        if fields:
            assert names_a_field(got.message, fields), (got.message, fields)
    else:
        assert got == want


def _nesting_of_text(text: str) -> int:
    """The model's own count, by a scan with a string state (not the server's regex)."""
    level = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            level += 1
            deepest = max(deepest, level)
        elif char in "]}":
            level -= 1
    return deepest


def frame_with(frame_type: str, name: str, raw: str) -> str:
    """A valid frame of `frame_type` whose field `name` is the JSON text `raw`."""
    base: dict[str, Any] = {
        "chat": {"id": "r1", "conversation": "c1", "text": "hi", "after": 3},
        "resume": {"id": "r1", "after": 3},
        "cancel": {"id": "r1"},
        "ping": {"t": 5},
        "pong": {"t": 5},
    }[frame_type]
    fields = {"type": json.dumps(frame_type)} | {k: json.dumps(v) for k, v in base.items()}
    fields[name] = raw
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in fields.items()) + "}"


# Nesting: arrays and objects down to any depth the byte limit allows, closed or not.
nested = st.builds(
    lambda openers, leaf, closed: (
        "".join(openers)
        + leaf
        + ("".join("]" if o == "[" else "}" for o in reversed(openers)) if closed else "")
    ),
    st.one_of(
        st.lists(st.sampled_from(["[", '{"k":', '{"":']), max_size=2 * MAX_NESTING),
        st.integers(MAX_NESTING - 2, MAX_BYTES).flatmap(
            lambda n: st.sampled_from([["["] * n, ['{"a":'] * (n // 5), ["[", '{"a":'] * (n // 7)])
        ),
    ),
    st.sampled_from(["1", '"x"', "null", "[]", "{}", '"[[[{{{"', '"\\\\"']),
    st.booleans(),
)

# Numbers: integers of any length, fractions, exponents far beyond a double's range, signs,
# and the forms JSON forbids (leading zeros, a bare dot, a plus, an empty exponent).
digits = st.text("0123456789", min_size=1, max_size=400)
numbers = st.one_of(
    st.builds(
        lambda sign, whole, fraction, exponent: sign + whole + fraction + exponent,
        st.sampled_from(["", "-"]),
        st.one_of(st.just("0"), digits.filter(lambda d: d[0] != "0")),
        st.one_of(st.just(""), digits.map(lambda d: "." + d)),
        st.one_of(
            st.just(""),
            st.builds(
                lambda e, sign, n: e + sign + str(n),
                st.sampled_from(["e", "E"]),
                st.sampled_from(["", "+", "-"]),
                st.one_of(st.integers(0, 400), st.integers(0, 999_999)),
            ),
        ),
    ),
    st.sampled_from(
        [
            *map(str, [2**53, 2**53 + 1, -(2**53), 2**64, -(2**64), 2**63 - 1]),
            *["-0", "-0.0", "0e0", "1e999999", "-1e999999", "1e-999999", "4.9e-324", "1.8e308"],
            *["01", "-01", "1.", ".5", "+1", "1e", "1e+", "--1", "0x10", "NaN", "Infinity", "-"],
        ]
    ),
)

# Escapes: every escape JSON has, \u escapes of any code unit (lone surrogates, pairs and
# pairs in the wrong order), escapes JSON lacks, and raw control characters.
HEX4 = st.integers(0, 0xFFFF).map(lambda n: f"\\u{n:04x}")
string_pieces = st.one_of(
    st.sampled_from(["\\n", "\\t", '\\"', "\\\\", "\\/", "\\b", "\\f", "\\r"]),
    HEX4,
    st.sampled_from(["\\ud83d\\ude00", "\\ude00\\ud83d", "\\ud800", "\\udfff", "\\u0000"]),
    st.sampled_from(["\\x41", "\\'", "\\u12", "\\U0001f600", "\\a", "\\"]),
    st.sampled_from(["\x00", "\x01", "\x1f", "\n", "\t", "\x7f", "\u2028", "\ufeff"]),
    st.text(string.ascii_letters + string.digits + "_-", max_size=6),
)
json_strings = st.lists(string_pieces, max_size=8).map(lambda parts: '"' + "".join(parts) + '"')


@fuzz(400)
@given(where=st.sampled_from(FRAME_FIELDS), raw=nested, as_bytes=st.booleans())
def test_nesting_to_any_depth_matches_the_model(
    where: tuple[str, str], raw: str, as_bytes: bool
) -> None:
    check_text_against_model(frame_with(*where, raw), as_bytes)


@fuzz(100)
@given(raw=nested)
def test_nesting_alone_matches_the_model(raw: str) -> None:
    check_text_against_model(raw, False)


def test_regression_a_few_thousand_brackets_are_bad_frame_not_recursion_error() -> None:
    # Found by a hostile client: msgspec raised RecursionError (not DecodeError) while the
    # id of the refused frame was looked for, and the wire server dropped the connection.
    for text in ["[" * 1000, '{"a":' * 200, '{"type":"cancel","id":"r1","x":' + "[" * 900]:
        got = outcome(text)
        assert isinstance(got, ErrorFrame) and (got.code, got.id) == (BAD_FRAME, None)


@fuzz(400)
@given(where=st.sampled_from(FRAME_FIELDS), raw=numbers, as_bytes=st.booleans())
def test_numbers_of_any_size_and_form_match_the_model(
    where: tuple[str, str], raw: str, as_bytes: bool
) -> None:
    check_text_against_model(frame_with(*where, raw), as_bytes)


@fuzz(400)
@given(where=st.sampled_from(FRAME_FIELDS), raw=json_strings, as_bytes=st.booleans())
def test_escapes_and_raw_characters_in_strings_match_the_model(
    where: tuple[str, str], raw: str, as_bytes: bool
) -> None:
    check_text_against_model(frame_with(*where, raw), as_bytes)


@fuzz(200)
@given(
    frame=client_frames,
    encoding=st.sampled_from(["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]),
)
def test_frames_in_other_encodings_or_with_a_bom_are_bad_frame(
    frame: ClientFrame, encoding: str
) -> None:
    # A WebSocket text message and a JSON body are UTF-8, without a byte order mark.
    data = encode(frame).decode().encode(encoding)
    if len(data) > MAX_BYTES:
        return
    got = outcome(data)
    assert isinstance(got, ErrorFrame) and (got.code, got.id) == (BAD_FRAME, None), got
    if encoding == "utf-8-sig":  # and a BOM in a str, as a text frame would carry it
        as_text = outcome("\ufeff" + encode(frame).decode())
        assert isinstance(as_text, ErrorFrame) and as_text.code == BAD_FRAME


@fuzz(200)
@given(
    where=st.sampled_from(FRAME_FIELDS),
    first=st.one_of(numbers, json_strings, st.sampled_from(["null", "true", "[]", '"a b"'])),
    last=st.one_of(numbers, json_strings, st.sampled_from(['"r2"', "7", '"ok"'])),
)
def test_duplicate_keys_each_checked_the_last_counts(
    where: tuple[str, str], first: str, last: str
) -> None:
    frame_type, name = where
    text = frame_with(frame_type, name, first)[:-1] + f",{json.dumps(name)}:{last}}}"
    got = outcome(text)
    # Each occurrence is checked as the field's value; the frame is the one with the last.
    judged = [_judge(frame_with(frame_type, name, raw)) for raw in (first, last)]
    if all(not isinstance(j, ErrorFrame) for j in judged):
        assert got == judged[1]
    else:
        assert isinstance(got, ErrorFrame) and got.code in (BAD_FRAME, TOO_LARGE), got


def _judge(text: str) -> ClientFrame | ErrorFrame:
    return outcome(text)


# ---- (d) round trips -------------------------------------------------------------------


@fuzz(400)
@given(frame=client_frames, as_bytes=st.booleans())
def test_every_valid_client_frame_round_trips(frame: ClientFrame, as_bytes: bool) -> None:
    data = encode(frame)
    if isinstance(frame, ChatFrame) and len(frame.text) > MAX_TEXT:
        return  # valid in shape, refused by size: covered by the model tests
    if len(data) > MAX_BYTES:
        return
    decoded = decode_client_frame(
        data if as_bytes else data.decode(), max_bytes=MAX_BYTES, max_text=MAX_TEXT
    )
    assert decoded == frame
    assert type(decoded) is type(frame)
    if isinstance(frame, PingFrame | PongFrame):
        assert type(decoded.t) is type(frame.t)  # an echoed `t` keeps its JSON type


@fuzz(300)
@given(frame=server_frames)
def test_every_server_frame_round_trips(frame: ServerFrame) -> None:
    assert decode_server_frame(encode(frame)) == frame


# ---- SSE ---------------------------------------------------------------------------------


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@fuzz(250)
@given(
    frames=st.lists(server_frames, min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 4000), max_size=8),
)
def test_sse_events_parse_back_to_the_same_frames(
    frames: list[ServerFrame], cuts: list[int]
) -> None:
    body = b"".join(frame_event(f).encode() for f in frames)
    parser = SseParser()
    # The network may cut the body anywhere, even between the CR and LF of one line end.
    for chunk in split_at(body, cuts):
        parser.feed(chunk)
    assert [decode_server_frame(json.dumps(e.data)) for e in parser.events] == frames
    for event, frame in zip(parser.events, frames, strict=True):
        assert event.event == frame.__struct_config__.tag
        seq = frame.seq if isinstance(frame, TokenFrame | DoneFrame) else None
        assert event.id == (None if seq is None else str(seq))


@fuzz(300)
@given(data=texts, seq=st.integers(1, MAX_SEQ))
def test_sse_token_text_survives_exactly(data: str, seq: int) -> None:
    # Every line end the SSE spec knows (CR, LF, CRLF) and every one it does not (U+2028,
    # NEL, form feed: str.splitlines would split on them) must come back as it was.
    parser = SseParser()
    parser.feed(frame_event(TokenFrame(id="s", seq=seq, data=data)).encode())
    (event,) = parser.events
    assert event.data == {"type": "token", "id": "s", "seq": seq, "data": data}


# ---- HTTP: the body of POST /api/chat ------------------------------------------------------


def chat_outcome(data: bytes) -> ChatRequest | ErrorFrame:
    try:
        request = decode_chat_request(data, max_bytes=MAX_BYTES, max_text=MAX_TEXT)
    except ProtocolError as exc:
        check_error(exc.frame)
        assert 400 <= HTTP_STATUS[exc.frame.code] < 500
        return exc.frame
    return request


REQUEST_FIELDS: Final = {"id": "id", "conversation": "id", "text": "str"}


@fuzz(300)
@given(data=st.one_of(st.binary(max_size=3000), json_values.map(lambda v: json.dumps(v).encode())))
def test_any_chat_body_is_accepted_or_a_400_class_error(data: bytes) -> None:
    got = chat_outcome(data)
    if isinstance(got, ChatRequest):
        assert ID_RE.fullmatch(got.id) and ID_RE.fullmatch(got.conversation)


@fuzz(300)
@given(
    body=st.fixed_dictionaries({"id": ids, "conversation": ids, "text": texts}),
    changes=mutations,
)
def test_mutated_chat_bodies_name_the_field(
    body: dict[str, Any], changes: list[tuple[str, str, Any]]
) -> None:
    for action, name, new in changes:
        if action == "set":
            body[name] = new
        else:
            body.pop(name, None)
    data = json.dumps(body).encode("utf-8", "surrogatepass")
    got = chat_outcome(data)
    if len(data) > MAX_BYTES:
        assert isinstance(got, ErrorFrame) and got.code == TOO_LARGE
        return
    if has_surrogate(body):
        assert isinstance(got, ErrorFrame) and got.code == BAD_FRAME
        return
    wrong = [
        name
        for name, kind in REQUEST_FIELDS.items()
        if name not in body or not valid(kind, body[name])
    ]
    if wrong:
        assert isinstance(got, ErrorFrame) and got.code == BAD_FRAME
        assert names_a_field(got.message, wrong), (got.message, wrong)
    elif len(body["text"]) > MAX_TEXT:
        assert isinstance(got, ErrorFrame) and (got.code, got.id) == (TOO_LARGE, body["id"])
    else:
        assert got == ChatRequest(body["id"], body["conversation"], body["text"])
