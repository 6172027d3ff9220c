"""What the page shows of each stream, kept exact by the protocol's client rules.

Pure: frames in, decisions out. For each stream the session knows the last seq shown.
A token at or below it is a duplicate (ignored); one that starts beyond `last + 1` is a
gap: the session asks for `resume` after `last`, and while that resume is pending it
ignores the stream's frames beyond `last + 1` (the server answers a resume with the
missing tokens first, then continues live). The text shown is therefore exactly the
provider's text, once, in order.

A stream whose `chat` has not been acknowledged yet (still in the offline queue) is not
resumed on reconnect: the server may never have seen its id, and a `resume` of an unknown
id is `not_found`. Re-sending the `chat` (same id) is what brings it back: the server acks
again and replays.
"""

from tokenwire.core.protocol import resume, token_first_seq

STREAMING = "streaming"
DONE = "done"  # finished normally (reason stop or length)
CANCELLED = "cancelled"
FAILED = "failed"  # ended by an error: the answer is incomplete, Retry offered
ENDED = (DONE, CANCELLED, FAILED)


class Stream:
    def __init__(self, id, conversation, last=0, status=STREAMING, acked=True):
        self.id = id
        self.conversation = conversation
        self.last = last
        self.status = status
        self.acked = acked  # False while its `chat` waits in the outbox for an `ack`
        self.resume_pending = False
        self.error = None  # the error frame that ended it, if any

    def to_dict(self):
        return {"id": self.id, "conversation": self.conversation, "last": self.last}


class Session:
    def __init__(self):
        self._streams = {}

    def get(self, id):
        return self._streams.get(id)

    def track(self, id, conversation, last=0, acked=True):
        """Show stream `id` from after `last` (a new answer, or one restored on reload).
        `acked=False` for a message still queued: it is sent as `chat`, not resumed."""
        stream = self._streams.get(id)
        if stream is None:
            stream = self._streams[id] = Stream(id, conversation, last, acked=acked)
        return stream

    def acked(self, id):
        """The server stored the stream's `chat`: from now on it is resumed like any."""
        stream = self._streams.get(id)
        if stream is not None:
            stream.acked = True

    def forget(self, id):
        self._streams.pop(id, None)

    def unfinished(self):
        return [s for s in self._streams.values() if s.status == STREAMING]

    def resume_frames(self):
        """On every (re)connect: resume each unfinished, acknowledged stream from its last
        seq (the others go again as `chat`, from the outbox)."""
        frames = []
        for stream in self.unfinished():
            if not stream.acked:
                continue
            stream.resume_pending = True
            frames.append(resume(stream.id, stream.last))
        return frames

    def on_token(self, frame):
        """Returns (text to append or None, frame to send or None)."""
        stream = self._streams.get(frame["id"])
        if stream is None or stream.status != STREAMING:
            return None, None  # not a stream this page shows, or already over
        first = token_first_seq(frame)
        if frame["seq"] <= stream.last:
            return None, None  # duplicate
        if first > stream.last + 1:
            if stream.resume_pending:
                return None, None  # the resume's answer will bring this
            stream.resume_pending = True
            return None, resume(stream.id, stream.last)
        # A frame may overlap what is shown (first <= last < seq) only if it joins tokens
        # we already have; its text cannot be split by seq, so ask again from `last`.
        if first < stream.last + 1:
            if stream.resume_pending:
                return None, None
            stream.resume_pending = True
            return None, resume(stream.id, stream.last)
        stream.last = frame["seq"]
        stream.resume_pending = False
        return frame["data"], None

    def on_done(self, frame):
        """Returns (new status or None if ignored, frame to send or None)."""
        stream = self._streams.get(frame["id"])
        if stream is None or stream.status != STREAMING:
            return None, None
        if frame["seq"] > stream.last:
            # Tokens are missing before the end: fetch them (the end comes again after).
            if stream.resume_pending:
                return None, None
            stream.resume_pending = True
            return None, resume(stream.id, stream.last)
        stream.status = CANCELLED if frame["reason"] == "cancelled" else DONE
        stream.resume_pending = False
        return stream.status, None

    def on_error(self, frame):
        """An error of a stream ends it; returns the new status or None."""
        stream = self._streams.get(frame.get("id"))
        if stream is None or stream.status != STREAMING:
            return None
        stream.status = FAILED
        stream.error = frame
        stream.resume_pending = False
        return FAILED
