"""RFC 6455 without I/O (`backend.transports.wsframes`), checked against the `websockets`
library's sans-I/O protocol objects as the reference implementation:

- client frames are made by a real `websockets` client (random masks, fragments, control
  frames between fragments) and must come out of `FrameReader` as the messages sent, however
  the bytes are cut into chunks and whenever `read` is called;
- frames `websockets` refuses to make are built by hand (`client_frame`), and each violation
  must close with the code RFC 6455 gives it; a `websockets` server fed the same bytes must
  close with the same code (the few places where the two differ on purpose are named);
- server frames and the handshake's answer are parsed by a `websockets` client, which must
  accept them (and refuse a wrong accept key, so the check means something).

Property tests are derandomized, bounded and without deadlines, like
tests/unit/test_protocol_fuzz.py.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any, Final

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus, ProtocolError
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from backend.transports.wsframes import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    HandshakeError,
    WireError,
    accept_key,
    check_upgrade,
    close_frame,
    frame,
    http_response,
    parse_close,
    switching_protocols,
    text_frame,
)
from tests.support.properties import fuzz

Message = tuple[int, str | bytes]
Outcome = tuple[list[Message], int | None]  # the messages read, then the close code or None

BIG: Final = 1 << 20  # a max_size no test message reaches
MASK: Final = b"\x37\xfa\x21\x3d"
RFC_KEY: Final = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455, section 1.3
RFC_ACCEPT: Final = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
VERSION_13: Final = (b"sec-websocket-version", b"13")


# ---- helpers -----------------------------------------------------------------------------


def request_headers(client: ClientProtocol) -> list[tuple[bytes, bytes]]:
    """The headers of the client's opening request, as the HTTP server hands them over."""
    request = client.connect()
    client.send_request(request)
    client.data_to_send()
    return [(name.lower().encode(), value.encode()) for name, value in request.headers.raw_items()]


def open_client(max_size: int | None = None) -> ClientProtocol:
    """A `websockets` client whose connection was opened by our answer to its request."""
    client = ClientProtocol(parse_uri("ws://tokenwire.test/ws"), max_size=max_size)
    client.receive_data(switching_protocols(check_upgrade(request_headers(client)), []))
    assert client.handshake_exc is None
    assert client.state is State.OPEN
    client.events_received()  # the 101 response
    return client


def sent(client: ClientProtocol) -> bytes:
    return b"".join(client.data_to_send())


def server_frames(data: bytes) -> list[Frame]:
    """Our server frames as a `websockets` client parses them (it fails on any error)."""
    client = open_client()
    client.receive_data(data)
    assert client.parser_exc is None, client.parser_exc
    return [event for event in client.events_received() if isinstance(event, Frame)]


def client_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
    width: int | None = None,
) -> bytes:
    """A client frame built by hand, for the frames `websockets` refuses to make. `rsv` is
    the three RSV bits (4 = RSV1), `length` a lie in the header, `width` the length field's
    size in bits (7, 16 or 64; the smallest that fits by default)."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    mask_bit = 0x80 if masked else 0
    if width is None:
        width = 7 if n < 126 else 16 if n < 65536 else 64
    if width == 7:
        head = bytes((first, mask_bit | n))
    elif width == 16:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def read_all(reader: FrameReader) -> list[Message]:
    messages = []
    while (message := reader.read()) is not None:
        messages.append(message)
    return messages


def read_chunks(
    chunks: Sequence[bytes], max_size: int = BIG, read_after: Sequence[bool] = ()
) -> Outcome:
    """Feed `chunks` to a new reader, reading all that is complete after each chunk (or
    only where `read_after` says so, and after the last); the messages, and the close code
    of the first violation."""
    reader = FrameReader(max_size)
    messages: list[Message] = []
    try:
        for i, chunk in enumerate(chunks):
            reader.feed(chunk)
            if i >= len(read_after) or read_after[i] or i == len(chunks) - 1:
                while (message := reader.read()) is not None:
                    messages.append(message)
    except WireError as exc:
        assert exc.code in (1002, 1007, 1009)
        return messages, exc.code
    return messages, None


def one_chunk(data: bytes) -> list[bytes]:
    return [data]


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def cut(data: bytes, points: Sequence[int]) -> list[bytes]:
    bounds = [0, *sorted(points), len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


FEEDS: Final = [pytest.param(one_chunk, id="one-chunk"), pytest.param(byte_by_byte, id="bytes")]


def reference_outcome(data: bytes, max_size: int = BIG) -> tuple[list[Message], int | None, int]:
    """What a `websockets` server makes of client bytes: the messages (text decoded here,
    since its sans-I/O layer leaves UTF-8 to the caller), the close code it fails with, and
    how many frames it accepted before failing."""
    server = ServerProtocol(state=State.OPEN, max_size=max_size)
    server.receive_data(data)
    frames = [event for event in server.events_received() if isinstance(event, Frame)]
    messages: list[Message] = []
    parts: list[bytes] = []
    opcode = Opcode.TEXT
    for f in frames:
        if f.opcode in (Opcode.PING, Opcode.PONG, Opcode.CLOSE):
            messages.append((int(f.opcode), bytes(f.data)))
            continue
        if f.opcode is not Opcode.CONT:
            opcode, parts = f.opcode, []
        parts.append(bytes(f.data))
        if not f.fin:
            continue
        payload = b"".join(parts)
        if opcode is Opcode.BINARY:
            messages.append((OP_BINARY, payload))
            continue
        try:
            messages.append((OP_TEXT, payload.decode()))
        except UnicodeDecodeError:
            return messages, 1007, len(frames)
    if server.parser_exc is None:
        return messages, None, len(frames)
    assert server.close_sent is not None
    return messages, int(server.close_sent.code), len(frames)


# ---- every kind of message round-trips ---------------------------------------------------

Send = Callable[[ClientProtocol], None]

ROUND_TRIPS: Final[list[Any]] = [
    pytest.param(lambda c: c.send_text(b""), [(OP_TEXT, "")], id="text-empty"),
    pytest.param(lambda c: c.send_text(b"hello"), [(OP_TEXT, "hello")], id="text-ascii"),
    pytest.param(
        lambda c: c.send_text("héllo wörld ✓ 🎉 日本語 \x00\r\n".encode()),
        [(OP_TEXT, "héllo wörld ✓ 🎉 日本語 \x00\r\n")],
        id="text-non-ascii",
    ),
    *(
        pytest.param(
            lambda c, n=n: c.send_text(b"a" * n), [(OP_TEXT, "a" * n)], id=f"text-{n}-bytes"
        )
        for n in (125, 126, 127, 65535, 65536)
    ),
    # 63 two-byte characters: 126 bytes, the first length that needs 16 bits.
    pytest.param(lambda c: c.send_text("é".encode() * 63), [(OP_TEXT, "é" * 63)], id="text-é*63"),
    pytest.param(lambda c: c.send_binary(b""), [(OP_BINARY, b"")], id="binary-empty"),
    pytest.param(
        lambda c: c.send_binary(bytes(range(256))),
        [(OP_BINARY, bytes(range(256)))],
        id="binary-every-byte",
    ),
    *(
        pytest.param(
            lambda c, n=n: c.send_binary(b"\xff" * n),
            [(OP_BINARY, b"\xff" * n)],
            id=f"binary-{n}-bytes",
        )
        for n in (125, 126, 65535, 65536)
    ),
    pytest.param(lambda c: c.send_ping(b""), [(OP_PING, b"")], id="ping-empty"),
    pytest.param(lambda c: c.send_ping(b"\x00" * 125), [(OP_PING, b"\x00" * 125)], id="ping-125"),
    pytest.param(lambda c: c.send_pong(b"keepalive"), [(OP_PONG, b"keepalive")], id="pong"),
    pytest.param(lambda c: c.send_close(), [(OP_CLOSE, b"")], id="close-empty"),
    pytest.param(
        lambda c: c.send_close(1000, "bye"), [(OP_CLOSE, b"\x03\xe8bye")], id="close-reason"
    ),
    pytest.param(
        lambda c: c.send_close(4000, "fermé ✓"),
        [(OP_CLOSE, b"\x0f\xa0" + "fermé ✓".encode())],
        id="close-non-ascii-reason",
    ),
    pytest.param(
        lambda c: (
            c.send_text(b"to", fin=False),
            c.send_ping(b"1"),
            c.send_continuation(b"ke", fin=False),
            c.send_pong(b"2"),
            c.send_continuation(b"ns", fin=True),
        ),
        [(OP_PING, b"1"), (OP_PONG, b"2"), (OP_TEXT, "tokens")],
        id="text-fragments-controls-between",
    ),
    pytest.param(
        lambda c: (
            c.send_binary(b"\x00\x01", fin=False),
            c.send_continuation(b"", fin=False),
            c.send_ping(b""),
            c.send_continuation(b"\x02", fin=True),
            c.send_binary(b"next"),
        ),
        [(OP_PING, b""), (OP_BINARY, b"\x00\x01\x02"), (OP_BINARY, b"next")],
        id="binary-fragments-empty-fragment",
    ),
    pytest.param(
        lambda c: (c.send_text(b"", fin=False), c.send_continuation(b"", fin=True)),
        [(OP_TEXT, "")],
        id="text-empty-fragments",
    ),
    pytest.param(
        # "é" is c3 a9, "🎉" is f0 9f 8e 89: every fragment alone is invalid UTF-8.
        lambda c: (
            c.send_text(b"a\xc3", fin=False),
            c.send_continuation(b"\xa9\xf0", fin=False),
            c.send_ping(b"mid-character"),
            c.send_continuation(b"\x9f", fin=False),
            c.send_continuation(b"\x8e", fin=False),
            c.send_continuation(b"\x89z", fin=True),
        ),
        [(OP_PING, b"mid-character"), (OP_TEXT, "aé🎉z")],
        id="text-characters-split-across-fragments",
    ),
    pytest.param(
        # RFC 6455 5.4: control frames, the close frame included, may come between fragments.
        lambda c: (c.send_text(b"unfinished", fin=False), c.send_close(1001, "")),
        [(OP_CLOSE, b"\x03\xe9")],
        id="close-between-fragments",
    ),
    pytest.param(
        lambda c: (c.send_text(b"one"), c.send_binary(b"two"), c.send_text(b"three")),
        [(OP_TEXT, "one"), (OP_BINARY, b"two"), (OP_TEXT, "three")],
        id="several-messages",
    ),
]


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize(("send", "expected"), ROUND_TRIPS)
def test_client_messages_round_trip(
    send: Send, expected: list[Message], feed: Callable[[bytes], list[bytes]]
) -> None:
    client = open_client()
    send(client)
    assert read_chunks(feed(sent(client))) == (expected, None)


@pytest.mark.parametrize(("send", "expected"), ROUND_TRIPS)
def test_client_messages_round_trip_cut_in_two_anywhere(
    send: Send, expected: list[Message]
) -> None:
    client = open_client()
    send(client)
    data = sent(client)
    points: Sequence[int] = range(len(data) + 1)
    if len(data) > 1000:  # the big ones: every cut in and around the header, and at the end
        points = [*range(20), *range(len(data) - 20, len(data) + 1)]
    for point in points:
        assert read_chunks(cut(data, [point])) == (expected, None), point


def test_close_payload_from_the_reader_parses() -> None:
    client = open_client()
    client.send_close(1001, "going away ✓")
    [(opcode, payload)], error = read_chunks([sent(client)])
    assert (opcode, error) == (OP_CLOSE, None)
    assert isinstance(payload, bytes)
    assert parse_close(payload) == (1001, "going away ✓")


def test_messages_complete_before_a_partial_frame_are_read_and_the_rest_follows() -> None:
    client = open_client()
    client.send_text(b"first")
    client.send_binary(b"second")
    client.send_text("third ✓".encode())
    data = sent(client)
    reader = FrameReader(BIG)
    reader.feed(data[:-3])
    assert reader.read() == (OP_TEXT, "first")  # the rest stays buffered, unread
    reader.feed(data[-3:-1])
    assert reader.read() == (OP_BINARY, b"second")
    assert reader.read() is None
    reader.feed(data[-1:])
    assert read_all(reader) == [(OP_TEXT, "third ✓")]
    assert reader.read() is None


@st.composite
def client_streams(draw: st.DrawFn) -> tuple[bytes, list[Message]]:
    """Bytes from a `websockets` client, and the messages they carry: text and binary
    messages cut into fragments anywhere (inside characters too, empty fragments too), pings
    and pongs on their own and between fragments, and maybe a close frame at the end."""
    client = open_client()
    expected: list[Message] = []
    controls = st.tuples(st.sampled_from([OP_PING, OP_PONG]), st.binary(max_size=125))

    def send_control() -> None:
        opcode, payload = draw(controls)
        (client.send_ping if opcode == OP_PING else client.send_pong)(payload)
        expected.append((opcode, payload))

    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["text", "binary", "control"]))
        if kind == "control":
            send_control()
            continue
        message: str | bytes
        if kind == "text":
            message = draw(st.text(max_size=200))
            data = message.encode()
        else:
            message = data = draw(st.binary(max_size=300))
        pieces = cut(data, draw(st.lists(st.integers(0, len(data)), max_size=4)))
        for i, piece in enumerate(pieces):
            fin = i == len(pieces) - 1
            if i == 0:
                (client.send_text if kind == "text" else client.send_binary)(piece, fin=fin)
            else:
                client.send_continuation(piece, fin=fin)
            if not fin and draw(st.booleans()):
                send_control()
        expected.append((OP_TEXT if kind == "text" else OP_BINARY, message))
    if draw(st.booleans()):
        code = draw(st.sampled_from([1000, 1001, 1008, 1011, 3000, 4999]))
        reason = draw(st.text(max_size=30))  # at most 120 bytes: fits a close frame
        client.send_close(code, reason)
        expected.append((OP_CLOSE, struct.pack("!H", code) + reason.encode()))
    return sent(client), expected


@fuzz(300)
@given(stream=client_streams(), data=st.data())
def test_client_streams_cut_anywhere_read_anytime_round_trip(
    stream: tuple[bytes, list[Message]], data: st.DataObject
) -> None:
    raw, expected = stream
    points = data.draw(st.lists(st.integers(0, len(raw)), max_size=12), label="cuts")
    chunks = cut(raw, points)
    read_after = data.draw(st.lists(st.booleans(), max_size=len(chunks)), label="read after")
    assert read_chunks(chunks, read_after=read_after) == (expected, None)
    assert read_chunks([raw]) == (expected, None)


def test_a_large_message_fed_one_byte_at_a_time_completes() -> None:
    text = "".join(chr(0x20 + i % 0x3000) for i in range(80_000))  # ~200 KB of UTF-8
    client = open_client()
    client.send_binary(bytes(range(256)) * 800)  # 204,800 bytes in one frame
    payload = text.encode()
    assert len(payload) > 200_000
    pieces = cut(payload, range(4096, len(payload), 4096))
    for i, piece in enumerate(pieces):
        fin = i == len(pieces) - 1
        if i == 0:
            client.send_text(piece, fin=fin)
        else:
            client.send_continuation(piece, fin=fin)
        if i % 10 == 0 and not fin:
            client.send_ping(b"%d" % i)
    data = sent(client)
    pings = [(OP_PING, b"%d" % i) for i in range(0, len(pieces) - 1, 10)]
    assert read_chunks(byte_by_byte(data)) == (
        [(OP_BINARY, bytes(range(256)) * 800), *pings, (OP_TEXT, text)],
        None,
    )


# ---- every violation closes with its code ------------------------------------------------

OK_FIRST: Final = client_frame(OP_TEXT, b"ok")  # each case starts with a valid message
# Over the control frames' 125 bytes: the reference checks the size limit first.
VIOLATIONS_MAX_SIZE: Final = 200


def frames(*parts: bytes) -> bytes:
    return b"".join(parts)


def violation(data: bytes, code: int, *, id: str, before: Sequence[Message] = ()) -> Any:
    """A case: `OK_FIRST`, then `data`, which must give the messages `before` and then
    close with `code`."""
    return pytest.param(OK_FIRST + data, [(OP_TEXT, "ok"), *before], code, id=id)


VIOLATIONS: Final[list[Any]] = [
    violation(client_frame(OP_TEXT, b"hi", masked=False), 1002, id="unmasked-text"),
    violation(client_frame(OP_PING, b"", masked=False), 1002, id="unmasked-ping"),
    violation(client_frame(OP_BINARY, b"\x00" * 300, masked=False), 1002, id="unmasked-16bit"),
    *(
        violation(client_frame(OP_TEXT, b"hi", rsv=rsv), 1002, id=f"rsv-bits-{rsv:03b}")
        for rsv in range(1, 8)
    ),
    violation(client_frame(OP_PING, b"", rsv=4), 1002, id="rsv1-on-ping"),
    violation(
        frames(client_frame(OP_TEXT, b"a", fin=False), client_frame(OP_CONT, b"b", rsv=2)),
        1002,
        id="rsv2-on-continuation",
    ),
    *(
        violation(client_frame(opcode, b"x"), 1002, id=f"unknown-opcode-{opcode:#x}")
        for opcode in (0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF)
    ),
    *(
        violation(client_frame(opcode, b"", fin=False), 1002, id=f"fragmented-{name}")
        for opcode, name in ((OP_PING, "ping"), (OP_PONG, "pong"), (OP_CLOSE, "close"))
    ),
    violation(client_frame(OP_PING, b"p" * 126), 1002, id="ping-126-bytes"),
    violation(client_frame(OP_PONG, b"p" * 200), 1002, id="pong-200-bytes"),
    violation(client_frame(OP_CLOSE, b"\x03\xe8" + b"r" * 124), 1002, id="close-126-bytes"),
    violation(client_frame(OP_PING, b"p" * 130, width=64), 1002, id="ping-64bit-length"),
    violation(client_frame(OP_CONT, b"x"), 1002, id="continuation-without-start"),
    violation(client_frame(OP_CONT, b"x", fin=False), 1002, id="unfinished-continuation-first"),
    violation(
        frames(client_frame(OP_TEXT, b"done"), client_frame(OP_CONT, b"x")),
        1002,
        id="continuation-after-complete-message",
        before=[(OP_TEXT, "done")],
    ),
    violation(
        # Not 1009 either: the size of the message that ended does not count any more.
        frames(
            client_frame(OP_TEXT, b"a" * 150, fin=False),
            client_frame(OP_CONT, b"b" * 49),
            client_frame(OP_CONT, b"c" * 5),
        ),
        1002,
        id="continuation-after-fragmented-message-ended",
        before=[(OP_TEXT, "a" * 150 + "b" * 49)],
    ),
    violation(
        frames(client_frame(OP_TEXT, b"a", fin=False), client_frame(OP_TEXT, b"b")),
        1002,
        id="text-inside-text",
    ),
    violation(
        frames(
            client_frame(OP_TEXT, b"a", fin=False),
            client_frame(OP_PING, b"between"),
            client_frame(OP_BINARY, b"b", fin=False),
        ),
        1002,
        id="binary-inside-text-after-ping",
        before=[(OP_PING, b"between")],
    ),
    violation(
        frames(client_frame(OP_BINARY, b"a", fin=False), client_frame(OP_TEXT, b"b")),
        1002,
        id="text-inside-binary",
    ),
    violation(client_frame(OP_TEXT, b"\xff"), 1007, id="utf8-invalid-byte"),
    violation(client_frame(OP_TEXT, b"caf\xc3"), 1007, id="utf8-truncated-character"),
    violation(client_frame(OP_TEXT, b"\xc0\xaf"), 1007, id="utf8-overlong"),
    violation(client_frame(OP_TEXT, b"\xed\xa0\x80"), 1007, id="utf8-surrogate"),
    violation(client_frame(OP_TEXT, b"\xf4\x90\x80\x80"), 1007, id="utf8-above-u10ffff"),
    violation(
        frames(client_frame(OP_TEXT, b"a\xc3", fin=False), client_frame(OP_CONT, b"(")),
        1007,
        id="utf8-invalid-across-fragments",
    ),
    violation(
        frames(client_frame(OP_TEXT, b"\xff", fin=False), client_frame(OP_CONT, b"fine")),
        1007,
        id="utf8-invalid-first-fragment",
    ),
    violation(client_frame(OP_BINARY, b"\x00" * 201), 1009, id="over-max-size"),
    violation(
        frames(client_frame(OP_BINARY, b"0" * 120, fin=False), client_frame(OP_CONT, b"1" * 81)),
        1009,
        id="over-max-size-in-second-fragment",
    ),
]


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize(("data", "before", "code"), VIOLATIONS)
def test_violations_close_with_their_code(
    data: bytes, before: list[Message], code: int, feed: Callable[[bytes], list[bytes]]
) -> None:
    assert read_chunks(feed(data), VIOLATIONS_MAX_SIZE) == (before, code)


@pytest.mark.parametrize(("data", "before", "code"), VIOLATIONS)
def test_the_websockets_server_closes_violations_with_the_same_code(
    data: bytes, before: list[Message], code: int
) -> None:
    assert reference_outcome(data, VIOLATIONS_MAX_SIZE)[:2] == (before, code)


@pytest.mark.parametrize("max_size", [BIG, 1 << 64], ids=["max-size-1MiB", "max-size-2**64"])
def test_a_64_bit_length_with_its_top_bit_set_is_a_protocol_error(max_size: int) -> None:
    # RFC 6455 5.2: "the most significant bit MUST be 0". (A `websockets` server calls it
    # too big, 1009, instead: it compares the length with its limit and nothing else.)
    header = struct.pack("!BBQ", 0x82, 0xFF, 1 << 63)
    assert read_chunks(byte_by_byte(OK_FIRST + header), max_size) == ([(OP_TEXT, "ok")], 1002)


@pytest.mark.parametrize(
    ("max_size", "length"),
    [(10, 11), (125, 126), (1000, 1001), (65535, 65536), (70_000, 70_001), (BIG, 1 << 40)],
    ids=["7-bit", "16-bit-limit-125", "16-bit", "64-bit-limit-65535", "64-bit", "1-TiB"],
)
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
def test_a_message_over_max_size_is_refused_from_its_header_alone(
    opcode: int, max_size: int, length: int
) -> None:
    header = client_frame(opcode, length=length)[:-4]  # no mask key, no payload
    reader = FrameReader(max_size)
    for byte in byte_by_byte(header[:-1]):
        reader.feed(byte)
        assert reader.read() is None
    reader.feed(header[-1:])
    with pytest.raises(WireError) as raised:
        reader.read()
    assert raised.value.code == 1009

    server = ServerProtocol(state=State.OPEN, max_size=max_size)
    server.receive_data(header)  # the reference decides from the header alone too
    assert server.close_sent is not None and server.close_sent.code == 1009


@pytest.mark.parametrize("max_size", [10, 126, 65536])
def test_a_message_of_exactly_max_size_is_accepted(max_size: int) -> None:
    client = open_client()
    client.send_binary(b"\x01" * max_size)
    client.send_text(b"a" * (max_size - 1), fin=False)
    client.send_ping(b"p" * 125)  # control frames are not part of the message's size
    client.send_continuation(b"b", fin=True)
    assert read_chunks(byte_by_byte(sent(client)), max_size) == (
        [
            (OP_BINARY, b"\x01" * max_size),
            (OP_PING, b"p" * 125),
            (OP_TEXT, "a" * (max_size - 1) + "b"),
        ],
        None,
    )


def test_each_message_has_its_own_size_budget() -> None:
    client = open_client()
    for _ in range(3):
        client.send_text(b"123456", fin=False)
        client.send_continuation(b"7890", fin=True)
    assert read_chunks([sent(client)], max_size=10) == ([(OP_TEXT, "1234567890")] * 3, None)


@pytest.mark.parametrize(
    "fragments",
    [[6, 5], [4, 4, 3], [10, 0, 1], [1] * 11],
    ids=["second", "third", "after-empty", "eleventh"],
)
def test_a_later_fragment_over_max_size_is_refused_from_its_header(fragments: list[int]) -> None:
    max_size = 10
    data = b""
    for i, size in enumerate(fragments[:-1]):
        data += client_frame(OP_TEXT if i == 0 else OP_CONT, b"x" * size, fin=False)
        # Empty: the reference counts control frames against the message's remaining size.
        data += client_frame(OP_PING, b"")
    last_header = client_frame(OP_CONT, length=fragments[-1])[:2]
    pings = [(OP_PING, b"")] * (len(fragments) - 1)
    assert read_chunks([data], max_size) == (pings, None)
    assert read_chunks([data, last_header], max_size) == (pings, 1009)
    assert reference_outcome(data + last_header, max_size)[:2] == (pings, 1009)


# ---- close frames ------------------------------------------------------------------------

CLOSE_PAYLOADS: Final[list[Any]] = [
    pytest.param(b"", (1005, ""), id="empty"),
    pytest.param(b"\x03", 1002, id="one-byte"),
    pytest.param(b"\x03\xe8", (1000, ""), id="1000"),
    pytest.param(b"\x03\xe8bye", (1000, "bye"), id="1000-reason"),
    pytest.param(b"\x03\xe9" + "à bientôt ✓".encode(), (1001, "à bientôt ✓"), id="non-ascii"),
    *(
        pytest.param(struct.pack("!H", code), (code, ""), id=str(code))
        for code in (1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999)
    ),
    *(
        pytest.param(struct.pack("!H", code) + b"x", 1002, id=f"invalid-{code}")
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535)
    ),
    pytest.param(b"\x03\xe8\xff", 1007, id="reason-invalid-utf8"),
    pytest.param(b"\x03\xe8ok\xc3", 1007, id="reason-truncated-character"),
]


def websockets_close_verdict(payload: bytes) -> tuple[int, str] | int:
    try:
        close = Close.parse(payload)
    except ProtocolError:
        return 1002
    except UnicodeDecodeError:
        return 1007
    return int(close.code), close.reason


@pytest.mark.parametrize(("payload", "expected"), CLOSE_PAYLOADS)
def test_parse_close(payload: bytes, expected: tuple[int, str] | int) -> None:
    assert websockets_close_verdict(payload) == expected  # the reference agrees
    if isinstance(expected, int):
        with pytest.raises(WireError) as raised:
            parse_close(payload)
        assert raised.value.code == expected
    else:
        assert parse_close(payload) == expected


@pytest.mark.parametrize(
    ("code", "reason", "data"),
    [
        (1000, "", b"\x88\x02\x03\xe8"),
        (1001, "bye", b"\x88\x05\x03\xe9bye"),
        (1009, "é", b"\x88\x04\x03\xf1\xc3\xa9"),
        (4000, "a" * 123, b"\x88\x7d\x0f\xa0" + b"a" * 123),
    ],
)
def test_close_frame_bytes(code: int, reason: str, data: bytes) -> None:
    assert close_frame(code, reason) == data
    client = open_client()
    client.receive_data(data)
    assert client.close_rcvd is not None
    assert (client.close_rcvd.code, client.close_rcvd.reason) == (code, reason)


@pytest.mark.parametrize(
    ("reason", "kept"),
    [
        ("a" * 124, "a" * 123),
        ("a" * 500, "a" * 123),
        ("é" * 70, "é" * 61),  # 122 bytes: a 62nd "é" would make 124
        ("🎉" * 40, "🎉" * 30),  # 120 bytes
        ("a" + "€" * 50, "a" + "€" * 40),  # 121 bytes
        ("ab" + "€" * 50, "ab" + "€" * 40),  # 122 bytes
        ("abc" + "€" * 50, "abc" + "€" * 40),  # exactly 123 bytes
        ("a" * 122 + "é", "a" * 122),
    ],
    ids=[
        "124-ascii",
        "500-ascii",
        "2-byte",
        "4-byte",
        "3-byte-off-1",
        "3-byte-off-2",
        "3-byte-fit",
        "last-char",
    ],
)
def test_close_frame_cuts_a_long_reason_at_a_character(reason: str, kept: str) -> None:
    data = close_frame(1011, reason)
    assert len(data) - 2 == data[1] <= 125
    assert parse_close(data[2:]) == (1011, kept)
    client = open_client()
    client.receive_data(data)
    assert client.close_rcvd is not None and client.close_rcvd.reason == kept


@fuzz(300)
@given(
    code=st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1012, 3000, 4999]),
    reason=st.text(max_size=150),
)
def test_close_frame_then_parse_close_gives_the_longest_prefix_that_fits(
    code: int, reason: str
) -> None:
    data = close_frame(code, reason)
    assert data[0] == 0x88 and data[1] == len(data) - 2 <= 125
    parsed_code, kept = parse_close(data[2:])
    assert parsed_code == code
    assert reason.startswith(kept)
    if kept != reason:
        assert len(kept.encode()) + len(reason[len(kept)].encode()) > 123
    assert [(f.opcode, bytes(f.data)) for f in server_frames(data)] == [(Opcode.CLOSE, data[2:])]


# ---- server frames -----------------------------------------------------------------------

LENGTHS: Final = [0, 1, 125, 126, 127, 65535, 65536, 70_000]


def header_size(n: int) -> int:
    return 2 if n < 126 else 4 if n < 65536 else 10


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize(
    ("encode", "opcode"),
    [
        pytest.param(text_frame, Opcode.TEXT, id="text_frame"),
        pytest.param(lambda p: frame(OP_TEXT, p), Opcode.TEXT, id="frame-text"),
        pytest.param(lambda p: frame(OP_BINARY, p), Opcode.BINARY, id="frame-binary"),
    ],
)
def test_server_data_frames_parse_in_websockets(
    encode: Callable[[bytes], bytes], opcode: Opcode, n: int
) -> None:
    payload = ("aé✓🎉" * n).encode()[:n] if opcode is Opcode.BINARY else b"t" * n
    data = encode(payload)
    assert len(data) == header_size(n) + n  # the shortest length field, no mask
    [parsed] = server_frames(data)
    assert (parsed.opcode, bytes(parsed.data), parsed.fin) == (opcode, payload, True)
    assert not (parsed.rsv1 or parsed.rsv2 or parsed.rsv3)


def test_server_frames_are_unmasked_so_our_reader_refuses_them() -> None:
    assert read_chunks([text_frame(b"hello")]) == ([], 1002)


@pytest.mark.parametrize(
    ("opcode", "payload"),
    [(Opcode.PING, b""), (Opcode.PING, b"x" * 125), (Opcode.PONG, b"beat")],
    ids=["ping-empty", "ping-125", "pong"],
)
def test_server_control_frames_parse_in_websockets(opcode: Opcode, payload: bytes) -> None:
    data = frame(int(opcode), payload)
    assert data[:2] == bytes((0x80 | int(opcode), len(payload)))
    [parsed] = server_frames(data)
    assert (parsed.opcode, bytes(parsed.data), parsed.fin) == (opcode, payload, True)


def test_text_frame_exact_bytes() -> None:
    assert text_frame(b"") == b"\x81\x00"
    assert text_frame(b"hi") == b"\x81\x02hi"
    assert text_frame(b"a" * 126) == b"\x81\x7e\x00\x7e" + b"a" * 126
    assert text_frame(b"a" * 65536) == b"\x81\x7f" + struct.pack("!Q", 65536) + b"a" * 65536


# ---- the opening handshake ---------------------------------------------------------------


def test_accept_key_of_rfc_6455_example() -> None:
    assert accept_key(RFC_KEY) == RFC_ACCEPT
    assert check_upgrade([(b"sec-websocket-key", RFC_KEY), VERSION_13]) == RFC_ACCEPT


@pytest.mark.parametrize(
    "headers",
    [
        [(b"host", b"x"), VERSION_13, (b"sec-websocket-key", RFC_KEY), (b"origin", b"o")],
        [(b"sec-websocket-key", b" " + RFC_KEY + b" "), (b"sec-websocket-version", b" 13 ")],
        # The first of a repeated header counts.
        [(b"sec-websocket-key", RFC_KEY), VERSION_13, (b"sec-websocket-key", b"AAAA")],
    ],
    ids=["other-headers", "spaces", "repeated"],
)
def test_check_upgrade_accepts(headers: list[tuple[bytes, bytes]]) -> None:
    assert check_upgrade(headers) == RFC_ACCEPT


@pytest.mark.parametrize(
    ("headers", "status", "extra"),
    [
        ([VERSION_13], 400, ()),
        ([VERSION_13, (b"sec-websocket-key", b"")], 400, ()),
        ([VERSION_13, (b"sec-websocket-key", b"not a base64 key!!!!!!=")], 400, ()),
        ([VERSION_13, (b"sec-websocket-key", RFC_KEY.rstrip(b"="))], 400, ()),
        ([VERSION_13, (b"sec-websocket-key", base64.b64encode(b"k" * 15))], 400, ()),
        ([VERSION_13, (b"sec-websocket-key", base64.b64encode(b"k" * 17))], 400, ()),
        ([VERSION_13, (b"sec-websocket-key", base64.b64encode(b"k" * 32))], 400, ()),
        ([(b"sec-websocket-key", RFC_KEY)], 426, (VERSION_13,)),
        ([(b"sec-websocket-key", RFC_KEY), (b"sec-websocket-version", b"8")], 426, (VERSION_13,)),
        ([(b"sec-websocket-key", RFC_KEY), (b"sec-websocket-version", b"14")], 426, (VERSION_13,)),
        ([(b"sec-websocket-key", RFC_KEY), (b"sec-websocket-version", b"")], 426, (VERSION_13,)),
        ([], 426, (VERSION_13,)),
    ],
    ids=[
        "no-key",
        "empty-key",
        "key-not-base64",
        "key-without-padding",
        "key-15-bytes",
        "key-17-bytes",
        "key-32-bytes",
        "no-version",
        "version-8",
        "version-14",
        "empty-version",
        "no-headers",
    ],
)
def test_check_upgrade_refuses(
    headers: list[tuple[bytes, bytes]], status: int, extra: tuple[tuple[bytes, bytes], ...]
) -> None:
    with pytest.raises(HandshakeError) as raised:
        check_upgrade(headers)
    assert (raised.value.status, raised.value.headers) == (status, extra)
    assert raised.value.reason


def test_switching_protocols_exact_bytes() -> None:
    assert switching_protocols(RFC_ACCEPT, [(b"x-node", b"a")]) == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"upgrade: websocket\r\n"
        b"connection: Upgrade\r\n"
        b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"x-node: a\r\n"
        b"\r\n"
    )


def test_websockets_client_accepts_our_101_and_only_with_the_right_key() -> None:
    client = ClientProtocol(parse_uri("ws://tokenwire.test/ws"))
    client.receive_data(
        switching_protocols(check_upgrade(request_headers(client)), [(b"x-node", b"a")])
    )
    [response] = client.events_received()
    assert client.handshake_exc is None and client.state is State.OPEN
    assert response.headers["x-node"] == "a"

    client = ClientProtocol(parse_uri("ws://tokenwire.test/ws"))
    request_headers(client)
    client.receive_data(switching_protocols(RFC_ACCEPT, []))  # the key of another request
    assert client.handshake_exc is not None and client.state is not State.OPEN


@pytest.mark.parametrize(
    ("status", "headers", "body", "expected"),
    [
        (
            400,
            [],
            b"missing Sec-WebSocket-Key header",
            b"HTTP/1.1 400 Bad Request\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: 32\r\n"
            b"connection: close\r\n"
            b"\r\n"
            b"missing Sec-WebSocket-Key header",
        ),
        (
            426,
            [VERSION_13],
            b"",
            b"HTTP/1.1 426 Upgrade Required\r\n"
            b"sec-websocket-version: 13\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: 0\r\n"
            b"connection: close\r\n"
            b"\r\n",
        ),
        (
            403,
            [],
            "refusé".encode(),
            b"HTTP/1.1 403 Forbidden\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: 7\r\n"
            b"connection: close\r\n"
            b"\r\n" + "refusé".encode(),
        ),
    ],
    ids=["400", "426", "403-non-ascii-body"],
)
def test_refusals_have_a_length_and_close_the_connection(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes, expected: bytes
) -> None:
    assert http_response(status, headers, body) == expected


def test_101_has_no_length_and_keeps_the_connection() -> None:
    response = http_response(101, [(b"sec-websocket-accept", RFC_ACCEPT)])
    assert response.endswith(b"\r\n\r\n")
    assert b"content-length" not in response and b"connection: close" not in response


def test_websockets_client_sees_the_426_refusal_and_the_version_we_speak() -> None:
    client = ClientProtocol(parse_uri("ws://tokenwire.test/ws"))
    headers = [(n, v) for n, v in request_headers(client) if n != b"sec-websocket-version"]
    with pytest.raises(HandshakeError) as raised:
        check_upgrade(headers)
    error = raised.value
    client.receive_data(http_response(error.status, list(error.headers), error.reason.encode()))
    assert isinstance(client.handshake_exc, InvalidStatus)
    assert client.handshake_exc.response.status_code == 426
    assert client.handshake_exc.response.headers["sec-websocket-version"] == "13"
    assert client.handshake_exc.response.body == error.reason.encode()


# ---- differential: any soup of frames, against the `websockets` server ----------------------

SoupFrame = tuple[int, bytes, bool, int, bool, int | None]  # opcode, payload, fin, rsv, mask, width
BAD_UTF8: Final = [b"\xc3", b"\xa9", b"\xf0\x9f", b"\xff", b"\xc0\xaf", b"\xed\xa0\x80"]


@st.composite
def frame_soups(draw: st.DrawFn) -> tuple[list[SoupFrame], int]:
    """Client frames and a max_size: valid messages (fragmented, with pings and pongs between
    fragments), then up to three mutations, each of which may break a rule: RSV bits, no
    mask, another opcode (unknown ones too), FIN flipped, bytes that are not UTF-8, a payload
    over max_size or over 125 bytes, a frame dropped, or a wider length field than needed
    (which both readers accept). No close frames: the reference stops at a close frame, and
    refuses one between fragments, which RFC 6455 allows."""
    max_size = draw(st.sampled_from([150, 400, BIG]))
    controls = st.tuples(st.sampled_from([OP_PING, OP_PONG]), st.binary(max_size=125))
    soup: list[list[Any]] = []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.integers(0, 3)) == 0:
            soup.append([*draw(controls), True, 0, True, None])
            continue
        opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
        data = (
            draw(st.text(max_size=60)).encode()
            if opcode == OP_TEXT
            else draw(st.one_of(st.binary(max_size=60), st.integers(0, 400).map(b"z".__mul__)))
        )
        pieces = cut(data, draw(st.lists(st.integers(0, len(data)), max_size=3)))
        for i, piece in enumerate(pieces):
            fin = i == len(pieces) - 1
            soup.append([opcode if i == 0 else OP_CONT, piece, fin, 0, True, None])
            if not fin and draw(st.booleans()):
                soup.append([*draw(controls), True, 0, True, None])
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(soup) - 1))
        mutation = draw(
            st.sampled_from(["rsv", "mask", "opcode", "fin", "utf8", "big", "drop", "width"])
        )
        if mutation == "rsv":
            soup[i][3] = draw(st.integers(1, 7))
        elif mutation == "mask":
            soup[i][4] = False
        elif mutation == "opcode":
            soup[i][0] = draw(st.sampled_from([0x0, 0x1, 0x2, 0x3, 0x7, 0x9, 0xA, 0xB, 0xF]))
        elif mutation == "fin":
            soup[i][2] = not soup[i][2]
        elif mutation == "utf8":
            at = draw(st.integers(0, len(soup[i][1])))
            soup[i][1] = soup[i][1][:at] + draw(st.sampled_from(BAD_UTF8)) + soup[i][1][at:]
        elif mutation == "big":
            soup[i][1] = b"y" * draw(st.sampled_from([126, 151, 401]))
        elif mutation == "drop" and len(soup) > 1:
            del soup[i]
        elif mutation == "width":
            soup[i][5] = draw(st.sampled_from([16, 64]))
    return [
        (op, payload, fin, rsv, masked, width) for op, payload, fin, rsv, masked, width in soup
    ], max_size


@fuzz(800)
@given(soup_and_size=frame_soups(), data=st.data())
def test_any_frames_read_as_the_websockets_server_reads_them(
    soup_and_size: tuple[list[SoupFrame], int], data: st.DataObject
) -> None:
    soup, max_size = soup_and_size
    raw = b"".join(
        client_frame(op, payload, fin=fin, rsv=rsv, masked=masked, width=width)
        for op, payload, fin, rsv, masked, width in soup
    )
    points = data.draw(st.lists(st.integers(0, len(raw)), max_size=10), label="cuts")
    chunks = cut(raw, points)
    read_after = data.draw(st.lists(st.booleans(), max_size=len(chunks)), label="read after")
    messages, code = read_chunks(chunks, max_size, read_after)
    assert read_chunks([raw], max_size) == (messages, code)  # the cuts change nothing

    expected, reference_code, accepted = reference_outcome(raw, max_size)
    if (messages, code) == (expected, reference_code):
        return
    # Where they differ, it must be one of the reference's known choices. Each is about the
    # frame it failed on, which comes right after the frames it accepted.
    failing_opcode, failing_payload, failing_fin, failing_rsv, *_ = soup[accepted]
    data_frames = [f for f in soup[:accepted] if f[0] in (OP_TEXT, OP_BINARY, OP_CONT)]
    unfinished = bool(data_frames) and not data_frames[-1][2]
    assert reference_code == 1009 and messages[: len(expected)] == expected
    if failing_opcode in (OP_PING, OP_PONG) and failing_fin and len(failing_payload) <= 125:
        # It counts a control frame between fragments against the message's remaining
        # size, and closes with 1009 on a frame that is fine.
        return
    # The frame also broke a rule we check before the size (the reference checks the size
    # first): RSV bits, a bad control frame, or a new message while one is unfinished.
    assert (messages, code) == (expected, 1002)
    assert (
        failing_rsv
        or failing_opcode in (OP_PING, OP_PONG)
        or (failing_opcode in (OP_TEXT, OP_BINARY) and unfinished)
    )
