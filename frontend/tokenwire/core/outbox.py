"""The offline queue: messages the user sent that the server has not acknowledged yet.

Pure: the browser layer persists `dumps()` in localStorage after every change and
restores with `loads()`, so a reload keeps the queue. Each message has its request id
from the moment it is typed; resending it is never a duplicate (the server replays).
Messages go one at a time, in order: the next is sent only after the previous is acked,
and a failed one is retried before those behind it.
"""

import json

QUEUED = "queued"
SENT = "sent"


class Outbox:
    def __init__(self):
        self.items = []  # dicts: id, conversation, text, state

    def add(self, id, conversation, text):
        self.items.append({"id": id, "conversation": conversation, "text": text, "state": QUEUED})

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

    def cancel_conversation(self, conversation):
        """Drop the conversation's queued messages (never sent); returns their ids."""
        dropped = [m["id"] for m in self.items if m["conversation"] == conversation]
        self.items = [m for m in self.items if m["conversation"] != conversation]
        return dropped

    def dumps(self):
        return json.dumps([[m["id"], m["conversation"], m["text"]] for m in self.items])

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
            if isinstance(row, list) and len(row) == 3 and all(isinstance(x, str) for x in row):
                self.add(row[0], row[1], row[2])
