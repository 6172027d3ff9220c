"""The outbox: a connection's frames of every stream leave exactly once, in order, and
joined while the socket is slow. Scripts of calls with the exact frames popped, then a
randomised shell that skips, repeats and reorders live events and restarts deliveries."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from backend.delivery.outbox import Offer, Outbox
from backend.protocol import (
    STREAM_EXPIRED,
    AckFrame,
    DoneFrame,
    ErrorFrame,
    MessageFrame,
    PingFrame,
    ServerFrame,
    StreamEnd,
    TokenFrame,
    error_frame,
)

S, T, U = "s1", "s2", "s3"
BIG = 1 << 30  # an outbox bound no script comes near


def tok(seq: int, data: str, n: int = 1, id: str = S) -> TokenFrame:
    return TokenFrame(id=id, seq=seq, data=data, n=n)


def done(seq: int, id: str = S) -> DoneFrame:
    return DoneFrame(id=id, seq=seq, reason="stop")


def drain(outbox: Outbox) -> list[ServerFrame]:
    frames = []
    while (frame := outbox.pop()) is not None:
        frames.append(frame)
    return frames


# ---- a script of calls, and what it must pop -------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Deliver `stream` from `after + 1`, the log having nothing more yet (a fresh chat)."""

    stream: str
    after: int = 0


@dataclass(frozen=True)
class Token:
    """A live event of `n` tokens joined in `data`, the last `seq`."""

    stream: str
    seq: int
    data: str
    offer: Offer
    n: int = 1


@dataclass(frozen=True)
class End:
    stream: str
    seq: int
    frame: StreamEnd
    offer: Offer


@dataclass(frozen=True)
class Follow:
    stream: str
    after: int


@dataclass(frozen=True)
class Fill:
    """One read of the log, then `finish_fill`; `caught_up` is what it must return."""

    stream: str
    tokens: tuple[str, ...]
    end: StreamEnd | None
    caught_up: bool


@dataclass(frozen=True)
class Push:
    frame: ServerFrame
    stream: str | None = None


@dataclass(frozen=True)
class Abandon:
    stream: str
    frame: ErrorFrame


@dataclass(frozen=True)
class Pop:
    """Pop until empty: exactly these frames, in this order."""

    frames: tuple[ServerFrame, ...]


Step = Start | Token | End | Follow | Fill | Push | Abandon | Pop


def pop(*frames: ServerFrame) -> Pop:
    return Pop(frames)


def fill(stream: str, tokens: Sequence[str], end: StreamEnd | None, caught_up: bool) -> Fill:
    return Fill(stream, tuple(tokens), end, caught_up)


ACK = AckFrame(id=S, conversation="c1")
PING = PingFrame(t=1)
EXPIRED = error_frame(STREAM_EXPIRED, "the stream's log expired", S)
Q, DUP, GAP, HELD, IGN = Offer.QUEUED, Offer.DUPLICATE, Offer.GAP, Offer.HELD, Offer.IGNORED

SCRIPTS = [
    pytest.param(
        [
            Start(S),
            Token(S, 2, "ab", Q, n=2),
            Token(S, 3, "c", Q),
            Token(S, 6, "def", Q, n=3),
            pop(tok(6, "abcdef", 6)),
        ],
        id="joined-events-join-further",
    ),
    pytest.param(
        [
            Start(S),
            Token(S, 2, "ab", Q, n=2),
            pop(tok(2, "ab", 2)),
            Token(S, 2, "ab", DUP, n=2),
            Token(S, 1, "a", DUP),
            Token(S, 4, "cd", Q, n=2),
            pop(tok(4, "cd", 2)),
        ],
        id="joined-duplicates-dropped",
    ),
    pytest.param(
        [
            Start(S),
            Token(S, 2, "ab", Q, n=2),
            pop(tok(2, "ab", 2)),
            # Overlaps what was sent (2..3 after 2): its text cannot be cut, read the log.
            Token(S, 3, "bc", GAP, n=2),
            fill(S, ["c"], None, caught_up=True),
            pop(tok(3, "c")),
        ],
        id="joined-overlap-is-read-from-the-log",
    ),
    pytest.param(
        [
            Start(S),
            Token(S, 1, "a", Q),
            Token(S, 5, "de", GAP, n=2),  # 4..5 after 1: 2..3 are missing
            Token(S, 7, "fg", HELD, n=2),
            fill(S, ["b", "c", "d", "e", "f", "g"], None, caught_up=True),
            pop(tok(1, "a"), tok(7, "bcdefg", 6)),
        ],
        id="joined-gap-then-fill",
    ),
    pytest.param(
        [
            # A stream this connection never heard of: its first event (seqs 1..2) starts
            # it; an event that does not start at seq 1 is left to a resume.
            Token(T, 2, "ab", Q, n=2),
            Token(U, 3, "bc", IGN, n=2),
            pop(tok(2, "ab", 2, id=T)),
        ],
        id="joined-first-event-of-an-unknown-stream",
    ),
    pytest.param(
        [
            Start(S),
            Token(S, 1, "Hel", Q),
            Token(S, 2, "lo", Q),
            Token(S, 3, "!", Q),
            pop(tok(3, "Hello!", 3)),
        ],
        id="unpopped-live-tokens-join",
    ),
    pytest.param(
        [
            Start(S),
            Token(S, 1, "a", Q),
            pop(tok(1, "a")),
            Token(S, 2, "b", Q),
            Token(S, 3, "c", Q),
            pop(tok(3, "bc", 2)),
            Token(S, 4, "d", Q),
            pop(tok(4, "d")),
        ],
        id="after-a-pop-a-new-frame",
    ),
    pytest.param(
        [
            Start(S),
            Token(S, 1, "a", Q),
            Token(S, 1, "a", DUP),
            pop(tok(1, "a")),
            Token(S, 1, "a", DUP),
            Token(S, 2, "b", Q),
            Token(S, 2, "b", DUP),
            Token(S, 1, "a", DUP),
            pop(tok(2, "b")),
        ],
        id="duplicates-dropped",
    ),
    pytest.param(
        [
            Start(S),
            Token(S, 1, "a", Q),
            Token(S, 4, "d", GAP),
            Token(S, 5, "e", HELD),
            Token(S, 2, "b", HELD),
            Token(S, 4, "d", HELD),
            fill(S, ["b", "c", "d"], None, caught_up=False),  # 5 was seen live: read again
            fill(S, ["e"], None, caught_up=True),
            Token(S, 5, "e", DUP),
            Token(S, 6, "f", Q),
            pop(tok(1, "a"), tok(4, "bcd", 3), tok(6, "ef", 2)),
        ],
        id="gap-held-then-filled",
    ),
    pytest.param(
        [
            Start(S),
            Token(S, 2, "b", GAP),
            fill(S, ["a"], None, caught_up=False),
            fill(S, [], None, caught_up=False),  # the log has not got 2 yet
            fill(S, ["b", "c"], None, caught_up=True),  # 3 was never seen live: still fine
            Token(S, 3, "c", DUP),
            pop(tok(1, "a"), tok(3, "bc", 2)),
        ],
        id="gap-fill-in-pieces",
    ),
    pytest.param(
        [
            Start(S),
            Start(T),
            Push(ACK, S),
            Token(S, 1, "a", Q),
            Token(T, 1, "x", Q),
            End(S, 1, done(1), Q),
            Follow(S, 0),
            Push(PING),
            fill(S, ["a"], done(1), caught_up=True),
            pop(ACK, tok(1, "x", id=T), PING, tok(1, "a"), done(1)),
        ],
        id="follow-drops-only-this-streams-tokens-and-end",
    ),
    pytest.param(
        [
            Start(S),
            Token(S, 1, "a", Q),
            Token(S, 2, "b", Q),
            pop(tok(2, "ab", 2)),
            Token(S, 3, "c", Q),
            Follow(S, 1),  # the client saw only 1: 2 and 3 again, 3 not yet sent is not lost
            Token(S, 4, "d", HELD),
            fill(S, ["b", "c", "d"], None, caught_up=True),
            pop(tok(4, "bcd", 3)),
        ],
        id="follow-from-before-what-was-sent",
    ),
    pytest.param(
        [
            Follow(S, 0),
            Push(ACK, S),
            fill(S, ["a", "b"], None, caught_up=True),
            Token(S, 3, "c", Q),
            pop(ACK, tok(3, "abc", 3)),
        ],
        id="ack-after-follow-comes-before-filled-tokens",
    ),
    pytest.param(
        [
            Start(S),
            Token(S, 1, "a", Q),
            Push(ACK, S),
            Token(S, 2, "b", Q),
            pop(tok(1, "a"), ACK, tok(2, "b")),
        ],
        id="push-for-a-stream-stops-joining-across-it",
    ),
    pytest.param(
        [
            Start(S),
            Token(S, 1, "a", Q),
            Push(PING),
            Token(S, 2, "b", Q),
            pop(tok(2, "ab", 2), PING),
        ],
        id="push-without-stream-lets-tokens-join",
    ),
    pytest.param(
        [
            Start(S),
            Token(S, 1, "a", Q),
            End(S, 1, done(1), Q),
            End(S, 1, done(1), DUP),
            Token(S, 1, "a", DUP),
            Token(S, 2, "b", DUP),
            pop(tok(1, "a"), done(1)),
            End(S, 1, done(1), DUP),
            pop(),
        ],
        id="end-queued-at-last-then-duplicate",
    ),
    pytest.param(
        [
            Start(S),
            Token(S, 1, "a", Q),
            End(S, 3, done(3), GAP),
            End(S, 3, done(3), HELD),
            fill(S, ["b", "c"], done(3), caught_up=True),
            End(S, 3, done(3), DUP),
            pop(tok(1, "a"), tok(3, "bc", 2), done(3)),
        ],
        id="end-beyond-last-is-a-gap",
    ),
    pytest.param(
        [
            Start(S),
            End(S, 0, done(0), Q),
            pop(done(0)),
        ],
        id="end-of-empty-stream",
    ),
    pytest.param(
        [
            # Met mid-way: ignored (the client resumes it; forwarding would race that).
            Token(S, 5, "e", IGN),
            Token(S, 6, "f", IGN),
            End(T, 3, done(3, id=T), IGN),
            # Met from its first token: delivered from there.
            Token(U, 1, "a", Q),
            Token(U, 2, "b", Q),
            Token(U, 2, "b", DUP),
            pop(tok(2, "ab", 2, id=U)),
        ],
        id="unknown-stream-delivered-only-from-its-start",
    ),
    pytest.param(
        [
            Start(S),
            Start(T),
            Token(S, 1, "a", Q),
            Token(S, 2, "b", Q),
            Token(T, 1, "x", Q),
            Abandon(S, EXPIRED),
            Token(S, 3, "c", DUP),
            End(S, 3, done(3), DUP),
            pop(tok(1, "x", id=T), EXPIRED),
        ],
        id="abandon-drops-pending-tokens-and-ends-with-the-error",
    ),
    pytest.param(
        [
            Start(S),
            Token(S, 2, "b", GAP),
            Abandon(S, EXPIRED),
            Token(S, 3, "c", DUP),
            pop(EXPIRED),
        ],
        id="abandon-during-fill",
    ),
    pytest.param(
        [
            Start(S),
            Start(T),
            Token(S, 1, "a", Q),
            Token(T, 1, "x", Q),
            Token(S, 2, "b", Q),
            Token(T, 2, "y", Q),
            pop(tok(2, "ab", 2), tok(2, "xy", 2, id=T)),
            Token(T, 3, "z", Q),
            Token(S, 3, "c", Q),
            Token(T, 4, "w", Q),
            End(S, 3, done(3), Q),
            Token(T, 6, "v", GAP),
            End(T, 6, done(6, id=T), HELD),
            fill(T, ["u", "v"], done(6, id=T), caught_up=True),
            pop(tok(4, "zw", 2, id=T), tok(3, "c"), done(3), tok(6, "uv", 2, id=T), done(6, id=T)),
        ],
        id="two-streams-interleaved-each-in-order",
    ),
    pytest.param(
        [
            Start(S),
            Token(S, 1, "a", Q),
            End(S, 1, done(1), Q),
            pop(tok(1, "a"), done(1)),
            Follow(S, 0),  # a resume after the end replays all of it
            fill(S, ["a"], done(1), caught_up=True),
            pop(tok(1, "a"), done(1)),
        ],
        id="follow-after-end-replays",
    ),
    pytest.param(
        [
            Push(MessageFrame(id="r9", conversation="c1", text="hi")),
            Push(PING),
            pop(MessageFrame(id="r9", conversation="c1", text="hi"), PING),
        ],
        id="control-frames-in-order",
    ),
]


def run(outbox: Outbox, step: Step) -> None:
    match step:
        case Start(stream, after):
            outbox.follow(stream, after)
            assert outbox.finish_fill(stream) is True
        case Token(stream, seq, data, offer, n):
            assert outbox.offer_token(stream, seq, data, n) is offer, step
        case End(stream, seq, frame, offer):
            assert outbox.offer_end(stream, seq, frame) is offer, step
        case Follow(stream, after):
            outbox.follow(stream, after)
        case Fill(stream, tokens, end, caught_up):
            outbox.fill(stream, tokens, end)
            assert outbox.finish_fill(stream) is caught_up, step
        case Push(frame, stream):
            outbox.push(frame, stream)
        case Abandon(stream, frame):
            outbox.abandon(stream, frame)
        case Pop(frames):
            assert drain(outbox) == list(frames)
            assert outbox.pending_bytes == 0
            assert len(outbox) == 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_script(script: list[Step]) -> None:
    outbox = Outbox(max_bytes=BIG)
    for step in script:
        run(outbox, step)
    assert isinstance(script[-1], Pop)
    assert outbox.overflowed is False


def test_live_end_that_arrives_during_a_log_read_is_delivered() -> None:
    """The shell reads the log, and while that read is in flight the generation finishes:
    the `done` arrives live (held, since a fill is running) and the read it started before
    has no end. The stream must still end on this connection."""
    outbox = Outbox(max_bytes=BIG)
    outbox.follow(S, 0)
    read_in_flight = (["a", "b"], None)  # the log had 2 tokens and no end yet
    assert outbox.offer_token(S, 2, "b") is Offer.HELD
    assert outbox.offer_end(S, 2, done(2)) is Offer.HELD
    outbox.fill(S, *read_in_flight)
    reads = 0
    while not outbox.finish_fill(S):  # the shell reads again: the log now has the end
        reads += 1
        assert reads < 5
        outbox.fill(S, [], done(2))
    assert drain(outbox) == [tok(2, "ab", 2), done(2)]


# ---- bounds ----------------------------------------------------------------------------------


def test_live_tokens_past_the_bound_overflow() -> None:
    outbox = Outbox(max_bytes=1000)
    outbox.follow(S, 0)
    assert outbox.finish_fill(S)
    for seq in range(1, 100):
        assert outbox.offer_token(S, seq, "x" * 100) is Offer.QUEUED
        assert outbox.overflowed is (outbox.pending_bytes > outbox.max_bytes)
        if outbox.overflowed:
            break
    assert outbox.overflowed
    assert 9 <= seq <= 11  # about 1000 bytes of text
    drain(outbox)
    assert outbox.pending_bytes == 0
    assert outbox.overflowed  # the shell closes the connection: it is not reset


def test_fill_never_overflows_when_the_caller_waits_for_room() -> None:
    outbox = Outbox(max_bytes=1000)
    log = [f"t{seq:04} " for seq in range(1, 2001)]  # 12 000 bytes, 12 times the bound
    outbox.follow(S, 0)
    popped: list[ServerFrame] = []
    rng = random.Random(7)
    while True:
        while outbox.has_room_for_fill:
            after = outbox.last_seq(S)
            piece = log[after : after + 8]
            end = done(len(log)) if after + len(piece) == len(log) else None
            outbox.fill(S, piece, end)
            assert not outbox.overflowed
            # As the shell does: a full read without the end means "read on".
            if (end is not None or len(piece) < 8) and outbox.finish_fill(S):
                break
        if not outbox.is_filling(S):
            break
        for _ in range(rng.randint(1, 4)):  # the socket takes a few frames
            if (frame := outbox.pop()) is not None:
                popped.append(frame)
    popped += drain(outbox)
    assert not outbox.overflowed
    assert outbox.pending_bytes == 0
    assert "".join(f.data for f in popped if isinstance(f, TokenFrame)) == "".join(log)
    assert popped[-1] == done(len(log))


# ---- a randomised shell ----------------------------------------------------------------------


@dataclass
class Shell:
    """One connection and one stream, as the WebSocket shell drives them, with a broker that
    loses, repeats and reorders live events (the log is always right)."""

    rng: random.Random
    reads_in_flight: bool  # a log read may be overtaken by live events, as with real awaits
    text: list[str]
    produced: int
    finished: bool
    outbox: Outbox
    # (seq, n, is_end) published and not yet delivered: an event of tokens seq-n+1 .. seq
    live: list[tuple[int, int, bool]]
    client_last: int
    popped: list[ServerFrame]
    filling: bool = False
    read: tuple[list[str], StreamEnd | None, int] | None = None  # tokens, end, limit
    restarts: int = 0

    @property
    def end(self) -> DoneFrame:
        return done(len(self.text))

    @property
    def done_popped(self) -> bool:
        return any(isinstance(f, DoneFrame) for f in self.popped)

    def follow(self, after: int) -> None:
        self.outbox.follow(S, after)
        self.filling, self.read = True, None  # the shell cancels a running fill

    def produce(self) -> None:
        if self.produced < len(self.text):
            # The generation joins the tokens it had at once into one event.
            n = self.rng.randint(1, min(3, len(self.text) - self.produced))
            self.produced += n
            self.live.append((self.produced, n, False))
        else:
            self.finished = True
            self.live.append((self.produced, 0, True))

    def deliver(self) -> None:
        # Mostly the oldest event; sometimes a later one overtakes it.
        index = 0 if self.rng.random() < 0.7 else self.rng.randrange(len(self.live))
        seq, n, is_end = self.live[index]
        fate = self.rng.random()
        if fate < 0.1 and not is_end:
            del self.live[index]  # lost (a lost `done` is not the outbox's to recover)
            return
        if fate >= 0.2:
            del self.live[index]  # else it stays, to be delivered again
        if is_end:
            offer = self.outbox.offer_end(S, seq, self.end)
        else:
            offer = self.outbox.offer_token(S, seq, "".join(self.text[seq - n : seq]), n)
        if offer is Offer.GAP:
            self.filling = True

    def start_read(self) -> None:
        after, limit = self.outbox.last_seq(S), self.rng.randint(1, 4)
        tokens = self.text[after : min(self.produced, after + limit)]
        reached = after + len(tokens) >= self.produced
        self.read = (tokens, self.end if self.finished and reached else None, limit)

    def finish_read(self) -> None:
        assert self.read is not None
        tokens, end, limit = self.read
        self.read = None
        self.outbox.fill(S, tokens, end)
        if (end is not None or len(tokens) < limit) and self.outbox.finish_fill(S):
            self.filling = False

    def pop(self) -> None:
        frame = self.outbox.pop()
        if frame is not None:
            self.popped.append(frame)
            if isinstance(frame, TokenFrame):
                self.client_last = frame.seq

    def step(self) -> bool:
        """One random action; False when there is nothing left to do."""
        actions = []
        if not self.finished:
            actions += [self.produce] * 3
        if self.live:
            actions += [self.deliver] * 4
        if self.filling and self.read is None:
            actions.append(self.start_read if self.reads_in_flight else self.read_at_once)
        if len(self.outbox):
            actions += [self.pop] * 2
        if self.read is not None and (not actions or self.rng.random() < 0.25):
            self.finish_read()  # a read takes a while: other things happen meanwhile
            return True
        if not actions:
            return False
        if self.restarts < 3 and not self.done_popped and self.rng.random() < 0.02:
            self.restarts += 1
            self.follow(self.client_last)  # the client resumes after what it has seen
        else:
            self.rng.choice(actions)()
        return True

    def read_at_once(self) -> None:
        self.start_read()
        self.finish_read()


def batches(rng: random.Random, count: int) -> list[tuple[int, int, bool]]:
    """Live events of tokens 1 .. count, joined by 1 to 3."""
    events, seq = [], 0
    while seq < count:
        n = rng.randint(1, min(3, count - seq))
        seq += n
        events.append((seq, n, False))
    return events


def simulate(seed: int, reads_in_flight: bool) -> tuple[list[ServerFrame], list[str], int]:
    """Returns the frames popped, the stream's text, and where the client first followed."""
    rng = random.Random(seed)
    text = [f"<{seq}>" for seq in range(1, rng.randint(0, 12) + 1)]
    produced = rng.randint(0, len(text))
    first_after = rng.randint(0, produced)
    shell = Shell(
        rng=rng,
        reads_in_flight=reads_in_flight,
        text=text,
        produced=produced,
        finished=produced == len(text) and rng.random() < 0.5,
        outbox=Outbox(max_bytes=BIG),
        # Events of tokens produced before the client came may still be on their way.
        live=[event for event in batches(rng, produced) if rng.random() < 0.5],
        client_last=first_after,
        popped=[],
    )
    if shell.finished:
        shell.live.append((produced, 0, True))
    shell.follow(first_after)
    for _ in range(100_000):
        if not shell.step():
            break
    else:
        pytest.fail(f"seed {seed}: the simulation did not settle")
    return shell.popped, text, first_after


def check(popped: list[ServerFrame], text: list[str], first_after: int) -> None:
    last = first_after
    for frame in popped[:-1]:
        assert isinstance(frame, TokenFrame), f"not a token before the end: {frame}"
        assert frame.seq - frame.n == last, f"after {last}, not the next token: {frame}"
        assert frame.data == "".join(text[last : frame.seq]), frame
        last = frame.seq
    assert popped, "nothing was delivered, not even the end"
    assert popped[-1] == done(len(text)), f"the last frame is not the end: {popped[-1]}"
    assert last == len(text)


@pytest.mark.parametrize("reads_in_flight", [False, True], ids=["atomic-reads", "reads-in-flight"])
def test_random_shell_delivers_the_log_exactly_once(reads_in_flight: bool) -> None:
    failures = []
    for seed in range(200):
        popped, text, first_after = simulate(seed, reads_in_flight)
        try:
            check(popped, text, first_after)
        except AssertionError as exc:
            failures.append(f"seed {seed}: {exc}".splitlines()[0])
    assert not failures, f"{len(failures)} of 200 seeds failed:\n" + "\n".join(failures[:10])
