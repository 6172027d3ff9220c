"""Client-side frames of the tokenwire protocol (PROTOCOL.md). Pure: no browser imports.

Written in the Python subset that MicroPython and CPython share: frames are plain dicts,
JSON is parsed here (never with JavaScript's JSON.parse, whose exceptions MicroPython
cannot catch), and anything malformed is dropped, not raised.
"""

import json

PROTOCOL_VERSION = 1

# Server frame type -> fields that must be present, with their JSON types.
_REQUIRED = {
    "hello": (("heartbeat", (int, float)),),
    "ack": (("id", str), ("conversation", str)),
    "message": (("id", str), ("conversation", str), ("text", str)),
    "token": (("id", str), ("seq", int), ("data", str)),
    "done": (("id", str), ("seq", int), ("reason", str)),
    "error": (("code", str), ("message", str)),
    "ping": (("t", (int, float)),),
    "pong": (("t", (int, float)),),
}


def chat(id, conversation, text, after=0):
    frame = {"type": "chat", "id": id, "conversation": conversation, "text": text}
    if after:
        frame["after"] = after
    return frame


def resume(id, after):
    return {"type": "resume", "id": id, "after": after}


def cancel(id):
    return {"type": "cancel", "id": id}


def ping(t):
    return {"type": "ping", "t": t}


def pong(t):
    return {"type": "pong", "t": t}


def encode(frame):
    return json.dumps(frame)


def decode(text):
    """A server frame as a dict, or None if it is not one we understand."""
    try:
        frame = json.loads(text)
    except (ValueError, TypeError):
        return None
    if not isinstance(frame, dict):
        return None
    required = _REQUIRED.get(frame.get("type"))
    if required is None:
        return None
    for name, kind in required:
        value = frame.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return None
    if frame["type"] == "token":
        n = frame.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or frame["seq"] < n:
            return None
        frame["n"] = n
    return frame


def token_first_seq(frame):
    """The seq of the first token joined in a `token` frame."""
    return frame["seq"] - frame["n"] + 1
