"""JSON by structure for the live fuzz (`bench/fuzz.py`): literals built piece by piece, each
with what it means, and the answer PROTOCOL.md promises for a frame (or a `POST /api/chat`
body) made of them.

Nothing here asks a decoder. Every literal is assembled from pieces whose meaning is known
by construction (an escape and the character it stands for, a number literal and its value
as Python's correctly rounded `int`/`float` read it, a nest and its depth), and `judge`
applies the server's promises to those meanings:

1. UTF-8 size above the frame limit: `too_large`, id null;
2. arrays and objects nested deeper than MAX_NESTING (the frame's own object is level 1,
   brackets inside strings do not count): `bad_frame`, id null;
3. no JSON (a syntax error, an escaped lone surrogate, a raw control character in a string,
   an invalid escape, ... anywhere, unknown fields included): `bad_frame`, id null;
4. otherwise an error names the frame's last `id` if that is a valid id, else null;
   a missing, repeated or unknown `type`, any occurrence of a known field with a wrong
   value (each occurrence is checked; the last one counts), a missing required field:
   `bad_frame`; a `text` over the character limit: `too_large`;
5. otherwise the frame is accepted with the last occurrence of each field. Unknown fields
   are skipped unchecked (numbers beyond a double included).
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from backend.protocol import BAD_FRAME, MAX_NESTING, MAX_SEQ, TOO_LARGE

# ---- literals ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lit:
    """One JSON value as source text, and what it means: `value` (str, int, float, bool,
    None, or an empty list/dict standing for any array/object); `ok` False when the text is
    no JSON at all; `depth` how deep arrays and objects nest in it (0 for a scalar)."""

    src: str
    value: Any = None
    ok: bool = True
    depth: int = 0


SHORT_ESCAPES: Final = {
    '"': '\\"',
    "\\": "\\\\",
    "/": "\\/",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
# Characters a string may hold: every kind JSON treats differently, and JSON's own syntax.
TEXT_POOLS: Final[list[str]] = [
    string.ascii_letters + string.digits,
    " \t\n\r\x00\x01\x1f\x7f\x80\x9f",  # whitespace, controls (must be escaped), DEL, C1
    '[]{}":,\\/',  # brackets, quotes and backslashes: the nesting count must skip strings
    "\u00e9\u00ff\u0100\u07ff\u0800\u2028\u2029\u202e\u200f\ufeff\ufffd\uffff",
    "\U00010000\U0001f600\U0010ffff",
]


def _hex4(rng: random.Random, cp: int) -> str:
    digits = f"{cp:04x}"
    return "\\u" + "".join(c.upper() if rng.random() < 0.5 else c for c in digits)


def escape_char(rng: random.Random, ch: str, escape: float) -> str:
    """`ch` as JSON string source: raw where JSON allows it (with probability 1 - `escape`),
    else one of its valid escapes (a short one, `\\uXXXX`, or a surrogate pair)."""
    cp = ord(ch)
    if cp >= 0x20 and ch not in '"\\' and rng.random() >= escape:
        return ch
    options = [SHORT_ESCAPES[ch]] if ch in SHORT_ESCAPES else []
    if cp < 0x10000:
        options.append(_hex4(rng, cp))
    else:
        high, low = 0xD800 + ((cp - 0x10000) >> 10), 0xDC00 + ((cp - 0x10000) & 0x3FF)
        options.append(_hex4(rng, high) + _hex4(rng, low))
    return rng.choice(options)


def string_of(rng: random.Random, value: str, escape: float = 0.3) -> Lit:
    """A JSON string meaning `value`, each character raw or escaped at random."""
    return Lit('"' + "".join(escape_char(rng, ch, escape) for ch in value) + '"', value)


def random_text(rng: random.Random, size: int) -> str:
    """`size` characters from every pool (never a surrogate: a str holding one cannot be
    sent in a text frame)."""
    out = []
    for _ in range(size):
        pool = rng.choice(TEXT_POOLS)
        out.append(rng.choice(pool) if rng.random() < 0.9 else chr(rng.randrange(0x20, 0xD800)))
    return "".join(out)


# Pieces that make a string no JSON, each followed by what keeps it so whatever comes next
# (a lone high surrogate must not meet a low one, `\u12` must not meet more hex digits).
def bad_piece(rng: random.Random) -> str:
    high = _hex4(rng, rng.randrange(0xD800, 0xDC00))
    low = _hex4(rng, rng.randrange(0xDC00, 0xE000))
    return rng.choice(
        [
            high + "x",  # a lone high surrogate, then a character
            high + "\\u0041",  # ... then an escape that is no low surrogate
            high + high + "x",  # two highs
            low,  # a lone low surrogate
            low + high + "x",  # a pair the wrong way round
            chr(rng.randrange(0x20)),  # a raw control character
            "\\x41",
            "\\'",
            "\\u12z",
            "\\u12G4",
            "\\uzzzz",
            "\\U0001F600",
            "\\a",
            "\\0",
            "\\v",
            "\\ ",
            "\\\u00e9",
        ]
    )


def string_lit(rng: random.Random, size: int, bad: bool = False, escape: float = 0.3) -> Lit:
    """A string of `size` random characters; with `bad`, one piece that makes it no JSON."""
    value = random_text(rng, size)
    src = "".join(escape_char(rng, ch, escape) for ch in value)
    if not bad:
        return Lit(f'"{src}"', value)
    at = rng.randint(0, len(value))
    # Cut between whole characters' sources: re-escape the two halves separately.
    head = "".join(escape_char(rng, ch, escape) for ch in value[:at])
    tail = "".join(escape_char(rng, ch, escape) for ch in value[at:])
    return Lit(f'"{head}{bad_piece(rng)}{tail}"', None, ok=False)


# ---- numbers -------------------------------------------------------------------------------

INT_EDGES: Final = [
    0,
    1,
    -1,
    2**31,
    2**53 - 1,
    2**53,
    2**53 + 1,
    -(2**53),
    -(2**53) - 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64 - 1,
    2**64,
    10**20,
    -(10**30),
]
FLOAT_EDGES: Final = [
    "1.0",
    "-0.0",
    "0e0",
    "0.0E-0",
    "1e2",
    "1E+2",
    "1e-2",
    "-1e-999999",
    "1e-999999",
    "1e999999",
    "-1e999999",
    "1.7976931348623157e308",  # the largest double
    "1.7976931348623158e308",  # rounds down to it
    "1.7976931348623159e308",  # rounds up: beyond a double
    "2e308",
    "5e-324",  # the smallest subnormal
    "2.4e-324",  # rounds to 0
    "2.5e-324",  # rounds to the smallest subnormal
    "9007199254740993.0",  # a float: rounds to 2**53, accepted as a double
    "3.14159265358979323846264338327950288419716939937510582097494459",
    "0.1000000000000000055511151231257827021181583404541015625",
    "123456789012345678901234567890.0",
    "1" + "0" * 400 + ".0",
    "0." + "0" * 400 + "1",
]
NOT_NUMBERS: Final = [
    "01",
    "-01",
    "00",
    "1.",
    "-1.",
    ".5",
    "-.5",
    "+1",
    "1e",
    "1e+",
    "1E-",
    "-",
    "--1",
    "0x10",
    "NaN",
    "nan",
    "Infinity",
    "-Infinity",
    "inf",
    "1_000",
    "1.5.5",
    "1e5.5",
    "1e1e1",
    "\uff11",
    "\u0663",
    "1 2",
    "0b1",
    "1.0f",
]


def _int_lit(n: int, rng: random.Random) -> Lit:
    src = "-0" if n == 0 and rng.random() < 0.3 else str(n)
    return Lit(src, n)


def number(rng: random.Random) -> Lit:
    """A number literal: an integer or a double at the edges that matter (2**53, 64 bits, a
    double's range, rounding, -0), a random one, or text that is no JSON number."""
    choice = rng.randrange(8)
    if choice == 0:
        return _int_lit(rng.choice(INT_EDGES), rng)
    if choice == 1:
        bound = 2 ** rng.choice([8, 32, 53, 54, 64, 100])
        return _int_lit(rng.randrange(-bound, bound + 1), rng)
    if choice == 2:
        digits = rng.randint(1, 400)
        first = rng.choice("123456789")
        n = int(first + "".join(rng.choices(string.digits, k=digits - 1)))
        return _int_lit(-n if rng.random() < 0.5 else n, rng)
    if choice == 3:
        src = rng.choice(FLOAT_EDGES)
        return Lit(src, float(src))
    if choice in (4, 5):
        # sign, integer part without leading zeros, fraction, exponent: JSON's grammar
        sign = rng.choice(["", "", "-"])
        whole = rng.choice(
            [
                "0",
                rng.choice("123456789") + "".join(rng.choices(string.digits, k=rng.randint(0, 20))),
            ]
        )
        frac = "." + "".join(rng.choices(string.digits, k=rng.randint(1, 25)))
        exp = rng.choice(["e", "E"]) + rng.choice(["", "+", "-"]) + str(rng.randint(0, 400))
        parts = rng.choice([(frac, ""), ("", exp), (frac, exp)])
        src = sign + whole + parts[0] + parts[1]
        return Lit(src, float(src))
    if choice == 6:
        value = rng.uniform(-1e9, 1e9) * 10.0 ** rng.randint(-300, 290)
        src = repr(value)
        return Lit(src, float(src))
    return Lit(rng.choice(NOT_NUMBERS), None, ok=False)


# ---- nesting -------------------------------------------------------------------------------


def nest(rng: random.Random, depth: int, core: Lit | None = None, balanced: bool = True) -> Lit:
    """`depth` levels of arrays and objects (depth >= 1) around `core` (default: a small
    number), built without recursion. Unbalanced: some closers missing (no JSON; the depth
    reached is still `depth`)."""
    core = core or Lit(str(rng.randint(0, 9)), 0)
    style = rng.choice(["array", "array", "object", "mixed"])
    openers, closers = [], []
    deepest = depth + core.depth
    for level in range(1, depth + 1):
        if style == "array" or (style == "mixed" and rng.random() < 0.5):
            sibling = rng.choice(["", "", "1,", '"[",', "[],", "{},"])
            if sibling in ("[],", "{},"):
                deepest = max(deepest, level + 1)  # one more level, beside the next
            openers.append("[" + sibling)
            closers.append("]")
        else:
            openers.append(rng.choice(['{"a":', '{"":', '{"{":', '{"x":1,"y":']))
            closers.append("}")
    closing = "".join(reversed(closers))
    if not balanced:
        closing = closing[: rng.randrange(len(closing))]
    ok = balanced and core.ok
    return Lit("".join(openers) + core.src + closing, [], ok, deepest)


def wide(rng: random.Random, count: int) -> Lit:
    """An array of `count` empty arrays and objects: many brackets, depth 2."""
    items = ",".join(rng.choice(["[]", "{}", "[[]]"]) for _ in range(count))
    return Lit(f"[{items}]", [], depth=3 if "[[]]" in items else 2)


def hills(rng: random.Random, depths: list[int]) -> Lit:
    """An array of nests one after another: the depth goes up and down, its most counts."""
    parts = [nest(rng, d) for d in depths]
    return Lit(
        "[" + ",".join(p.src for p in parts) + "]", [], depth=1 + max(p.depth for p in parts)
    )


def any_value(rng: random.Random) -> Lit:
    """A small valid JSON value of any type."""
    choice = rng.randrange(7)
    if choice == 0:
        return Lit("null", None)
    if choice == 1:
        flag = rng.random() < 0.5
        return Lit("true" if flag else "false", flag)
    if choice == 2:
        lit = number(rng)
        return lit if lit.ok else Lit("7", 7)
    if choice == 3:
        return string_lit(rng, rng.randint(0, 12))
    if choice == 4:
        return Lit("[]", [], depth=1)
    if choice == 5:
        return Lit('{"a":[1,{"b":null}]}', {}, depth=3)
    return nest(rng, rng.randint(1, 4))


# ---- objects -------------------------------------------------------------------------------

Pair = tuple[Lit, Lit]  # a key (a string literal) and its value


def key(rng: random.Random, name: str, escape: float = 0.1) -> Lit:
    return string_of(rng, name, escape)


def pair(rng: random.Random, name: str, value: Lit, escape: float = 0.1) -> Pair:
    return key(rng, name, escape), value


JSON_SPACE: Final = ["", "", "", " ", "\n", "\t", "\r\n", "  \t"]


def obj_src(rng: random.Random, pairs: list[Pair], spaced: float = 0.1) -> str:
    """The JSON object text of `pairs`, in their order, with JSON whitespace at random."""

    def ws() -> str:
        return rng.choice(JSON_SPACE) if rng.random() < spaced else ""

    body = ",".join(f"{ws()}{k.src}{ws()}:{ws()}{v.src}{ws()}" for k, v in pairs)
    return "{" + body + ws() + "}"


# ---- the promised answer -------------------------------------------------------------------

ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")  # PROTOCOL.md, "Identifiers"
TIME_BOUND: Final = 2**53  # `t`: an integer JavaScript holds exactly, or a finite double


def is_ident(value: Any) -> bool:
    return type(value) is str and ID_RE.fullmatch(value) is not None


def is_seq(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_SEQ


def is_time(value: Any) -> bool:
    if type(value) is int:
        return abs(value) <= TIME_BOUND
    return type(value) is float and math.isfinite(value)


def is_str(value: Any) -> bool:
    return type(value) is str


Rule = tuple[Callable[[Any], bool], bool]  # (a value's check, required)
FRAME_FIELDS: Final[dict[str, dict[str, Rule]]] = {
    "chat": {
        "id": (is_ident, True),
        "conversation": (is_ident, True),
        "text": (is_str, True),
        "after": (is_seq, False),
    },
    "resume": {"id": (is_ident, True), "after": (is_seq, True)},
    "cancel": {"id": (is_ident, True)},
    "ping": {"t": (is_time, True)},
    "pong": {"t": (is_time, True)},
}
# The body of `POST /api/chat`: a chat frame without `type` (or `after`).
CHAT_BODY: Final[dict[str, Rule]] = {
    "id": (is_ident, True),
    "conversation": (is_ident, True),
    "text": (is_str, True),
}


@dataclass(frozen=True)
class Refused:
    code: str
    id: str | None


@dataclass(frozen=True)
class Accepted:
    type: str | None  # None for a chat body
    fields: dict[str, Any]


def judge(
    pairs: list[Pair], size: int, max_bytes: int, max_text: int, body: bool = False
) -> Refused | Accepted:
    """What the server must answer to the object of `pairs` whose text is `size` UTF-8
    bytes: a frame (`body` False) or a `POST /api/chat` body (True). The rules in order,
    as the module's docstring lists them."""
    if size > max_bytes:
        return Refused(TOO_LARGE, None)
    if 1 + max((v.depth for _, v in pairs), default=0) > MAX_NESTING:
        return Refused(BAD_FRAME, None)
    if not all(k.ok and v.ok for k, v in pairs):
        return Refused(BAD_FRAME, None)
    ids = [v.value for k, v in pairs if k.value == "id"]
    error_id = ids[-1] if ids and is_ident(ids[-1]) else None
    kind: str | None = None
    if body:
        rules = CHAT_BODY
    else:
        types = [v.value for k, v in pairs if k.value == "type"]
        if len(types) != 1 or not is_str(types[0]) or types[0] not in FRAME_FIELDS:
            return Refused(BAD_FRAME, error_id)
        kind = types[0]
        rules = FRAME_FIELDS[types[0]]
    last: dict[str, Any] = {}
    for k, v in pairs:
        rule = rules.get(k.value)
        if rule is None:
            continue  # unknown: skipped unchecked
        if not rule[0](v.value):
            return Refused(BAD_FRAME, error_id)
        last[k.value] = v.value
    if any(required and name not in last for name, (_, required) in rules.items()):
        return Refused(BAD_FRAME, error_id)
    if "text" in last and len(last["text"]) > max_text:
        return Refused(TOO_LARGE, error_id)
    return Accepted(kind, last)


def utf8_size(text: str) -> int:
    return len(text.encode("utf-8"))
