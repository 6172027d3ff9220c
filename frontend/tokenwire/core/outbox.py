"""The offline queue: messages the user sent that the server has not acknowledged yet.

Pure: the browser layer persists `dumps()` in localStorage after every change and
restores with `loads()`, so a reload keeps the queue. Each message has its request id
from the moment it is typed; resending it is never a duplicate (the server replays).
Messages go one at a time, in order: the next is sent only after the previous is acked,
and a failed one is retried before those behind it.

Cancelling a queued message promises it is never sent, so only a message that never went
on the wire can be cancelled: once sent (`tried`), the server may have stored it even if
its ack was lost, and resending it (same id) is the only way to learn. `tried` survives a
reload for the same reason.
"""

import json

QUEUED = "queued"
SENT = "sent"


class Outbox:
    def __init__(self):
        self.items = []  # dicts: id, conversation, text, state

    def add(self, id, conversation, text, tried=False):
        self.items.append(
            {"id": id, "conversation": conversation, "text": text, "state": QUEUED, "tried": tried}
        )

    def pending(self, conversation=None):
        return [m for m in self.items if conversation is None or m["conversation"] == conversation]

    def next_to_send(self):
        """The message to send now, or None: the first one, unless it is already in flight."""
        if not self.items or self.items[0]["state"] == SENT:
            return None
        return self.items[0]

    def mark_sent(self, id):
        for m in self.items:
            if m["id"] == id:
                m["state"] = SENT
                m["tried"] = True

    def acked(self, id):
        """The server stored it: drop it. Returns the message, or None if unknown."""
        for i, m in enumerate(self.items):
            if m["id"] == id:
                return self.items.pop(i)
        return None

    def failed(self, id):
        """Sending failed in a way worth retrying: it goes again, before the others."""
        for m in self.items:
            if m["id"] == id:
                m["state"] = QUEUED

    def disconnected(self):
        """Nothing is in flight on a dead connection: everything goes again on reconnect."""
        for m in self.items:
            m["state"] = QUEUED

    def cancellable(self, id):
        """True for a queued message that never went on the wire."""
        return any(m["id"] == id and not m["tried"] for m in self.items)

    def cancel(self, id):
        """Drop a message that was never sent; returns it, or None (unknown, or already
        sent: it can no longer be taken back)."""
        for i, m in enumerate(self.items):
            if m["id"] == id:
                return None if m["tried"] else self.items.pop(i)
        return None

    def cancel_conversation(self, conversation):
        """Drop the conversation's messages that were never sent; returns their ids."""
        dropped = [
            m["id"] for m in self.items if m["conversation"] == conversation and not m["tried"]
        ]
        self.items = [m for m in self.items if m["id"] not in dropped]
        return dropped

    def dumps(self):
        return json.dumps(
            [[m["id"], m["conversation"], m["text"], 1 if m["tried"] else 0] for m in self.items]
        )

    def loads(self, text):
        """Restore a saved queue (anything unreadable is ignored, never raised)."""
        try:
            rows = json.loads(text) if text else []
        except (ValueError, TypeError):
            rows = []
        self.items = []
        if not isinstance(rows, list):
            return
        for row in rows:
            # [id, conversation, text, tried]; rows saved before `tried` existed have 3.
            if not isinstance(row, list) or len(row) not in (3, 4):
                continue
            if all(isinstance(x, str) for x in row[:3]):
                self.add(row[0], row[1], row[2], len(row) == 4 and row[3] == 1)
