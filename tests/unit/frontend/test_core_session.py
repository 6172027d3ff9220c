# The client session's exactly-once rules (PROTOCOL.md, "Client rules"). Runs under
# CPython (pytest) and MicroPython (tests/unit/frontend/run_micropython.mjs): plain asserts only.

from tokenwire.core.session import CANCELLED, DONE, FAILED, STREAMING, Session


def tok(id, seq, data, n=1):
    return {"type": "token", "id": id, "seq": seq, "data": data, "n": n}


def done(id, seq, reason="stop"):
    return {"type": "done", "id": id, "seq": seq, "reason": reason}


def shown(session, frames):
    """Feed frames; return (text shown, frames the session asked to send)."""
    text, sent = "", []
    for f in frames:
        if f["type"] == "token":
            t, reply = session.on_token(f)
        else:
            _status, reply = session.on_done(f)
            t = None
        if t:
            text += t
        if reply is not None:
            sent.append(reply)
    return text, sent


def test_in_order_tokens_are_shown_once():
    s = Session()
    s.track("a", "c")
    text, sent = shown(s, [tok("a", 1, "Hel"), tok("a", 2, "lo"), tok("a", 4, " wor", 2)])
    assert text == "Hello wor"
    assert sent == []
    assert s.get("a").last == 4


def test_duplicates_are_ignored():
    s = Session()
    s.track("a", "c")
    text, sent = shown(
        s, [tok("a", 1, "x"), tok("a", 1, "x"), tok("a", 2, "y"), tok("a", 2, "yy", 2)]
    )
    assert text == "xy"
    assert sent == []


def test_a_gap_asks_for_resume_once_and_ignores_frames_beyond_until_it_is_filled():
    s = Session()
    s.track("a", "c")
    text, sent = shown(s, [tok("a", 1, "a"), tok("a", 3, "c"), tok("a", 4, "d")])
    assert text == "a"
    assert sent == [{"type": "resume", "id": "a", "after": 1}]
    text, sent = shown(s, [tok("a", 4, "bcd", 3), tok("a", 5, "e")])
    assert text == "bcde"
    assert sent == []


def test_a_frame_overlapping_what_is_shown_asks_again():
    s = Session()
    s.track("a", "c")
    shown(s, [tok("a", 1, "a"), tok("a", 2, "b")])
    text, sent = shown(s, [tok("a", 3, "bc", 2)])
    assert text == ""
    assert sent == [{"type": "resume", "id": "a", "after": 2}]


def test_done_ends_the_stream_and_later_frames_are_ignored():
    s = Session()
    s.track("a", "c")
    shown(s, [tok("a", 1, "a")])
    assert s.on_done(done("a", 1)) == (DONE, None)
    assert s.on_token(tok("a", 2, "b")) == (None, None)
    assert s.get("a").status == DONE
    assert s.unfinished() == []


def test_done_beyond_last_asks_for_the_missing_tokens_first():
    s = Session()
    s.track("a", "c")
    shown(s, [tok("a", 1, "a")])
    status, reply = s.on_done(done("a", 3))
    assert status is None
    assert reply == {"type": "resume", "id": "a", "after": 1}
    text, _ = shown(s, [tok("a", 3, "bc", 2)])
    assert text == "bc"
    assert s.on_done(done("a", 3, "cancelled")) == (CANCELLED, None)


def test_resume_frames_cover_every_unfinished_stream():
    s = Session()
    s.track("a", "c")
    s.track("b", "c", 7)
    s.track("z", "c")
    shown(s, [tok("a", 1, "a"), tok("a", 2, "b")])
    s.on_done(done("z", 0))
    frames = s.resume_frames()
    frames.sort(key=lambda f: f["id"])
    assert frames == [
        {"type": "resume", "id": "a", "after": 2},
        {"type": "resume", "id": "b", "after": 7},
    ]
    # While those resumes are pending, frames beyond last + 1 are ignored without asking.
    assert s.on_token(tok("a", 9, "x")) == (None, None)


def test_error_marks_the_stream_failed():
    s = Session()
    s.track("a", "c")
    err = {"type": "error", "id": "a", "code": "stream_expired", "message": "gone"}
    assert s.on_error(err) == FAILED
    assert s.get("a").status == FAILED
    assert s.on_error(err) is None


def test_frames_of_streams_not_shown_are_ignored():
    s = Session()
    assert s.on_token(tok("x", 1, "a")) == (None, None)
    assert s.on_done(done("x", 1)) == (None, None)
    assert s.get("x") is None


def test_random_delivery_with_resume_shows_the_text_exactly_once():
    import random

    tokens = [f"t{i} " for i in range(1, 61)]
    for seed in range(60):
        random.seed(seed)
        s = Session()
        s.track("a", "c")
        text = ""
        pending = [(i + 1, tokens[i]) for i in range(len(tokens))]
        steps = 0
        while s.get("a").status == STREAMING and steps < 2000:
            steps += 1
            stream = s.get("a")
            if random.randint(0, 3) == 0 or not pending:
                # The server answers a resume (or sends the end): from last + 1 on.
                rest = tokens[stream.last :]
                if rest:
                    k = random.randint(1, len(rest))
                    frame = tok("a", stream.last + k, "".join(rest[:k]), k)
                    t, _ = s.on_token(frame)
                    text += t or ""
                else:
                    s.on_done(done("a", len(tokens)))
                continue
            seq, data = pending[random.randint(0, len(pending) - 1)]
            t, _ = s.on_token(tok("a", seq, data))  # live, in any order, maybe again
            text += t or ""
        assert text == "".join(tokens), seed
        assert s.get("a").status == DONE


def test_a_stream_still_queued_is_not_resumed_until_acked():
    # Its `chat` waits in the outbox: a `resume` of an id the server never saw would be
    # answered `not_found` and end the stream before the `chat` is even sent.
    s = Session()
    s.track("sent", "c")
    s.track("queued", "c", acked=False)
    assert s.resume_frames() == [{"type": "resume", "id": "sent", "after": 0}]
    s.acked("queued")
    frames = s.resume_frames()
    frames.sort(key=lambda f: f["id"])
    assert [f["id"] for f in frames] == ["queued", "sent"]
    s.acked("unknown")  # an ack of a stream not shown: nothing to do
