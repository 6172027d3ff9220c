"""What the user sends, stops and cancels, and the offline queue it waits in.

It owns the composer form (#composer, #input, #send), Stop (#stop), "Cancel queued"
(#cancel-queued) and the queue (`Outbox`), which is saved to localStorage after every
change, so that a reload keeps it.

Promises:
- a message is queued before it is sent, and the queue goes one message at a time,
  whenever the connection is open: a `chat` frame over the WebSocket or, in SSE mode,
  `POST /api/chat` (docs/PROTOCOL.md). A resend after a lost ack reuses the request id,
  so it is never a second message;
- a queued message that never went on the wire can be cancelled, and then is never sent;
- Stop sends `cancel` only once it can be sent and the server has acked the stream (see
  `send_cancels`); a Stop the connection could not carry is sent on the next one.
"""

import asyncio

from pyscript import document

from tokenwire.browser.web import (
    RETRY_DELAY,
    later,
    listen,
    new_id,
    post_json,
    storage_get,
    storage_set,
)
from tokenwire.core import protocol
from tokenwire.core.outbox import Outbox
from tokenwire.core.session import STREAMING

OUTBOX_KEY = "tokenwire.outbox"


class Composer:
    def __init__(self, session, transcript, driver, current):
        self.session = session
        self.transcript = transcript
        self.driver = driver
        self.current = current  # () -> the id of the conversation shown: messages go there
        self.form = document.getElementById("composer")
        self.input = document.getElementById("input")
        self.send_button = document.getElementById("send")
        self.stop_button = document.getElementById("stop")
        self.cancel_all_button = document.getElementById("cancel-queued")
        self.outbox = Outbox()
        self.outbox.loads(storage_get(OUTBOX_KEY))
        self.cancels = []  # streams the user stopped while the cancel could not be sent

    def watch(self):
        """Take the user's Enter, Send, Stop and "Cancel queued"."""
        listen(self.form, "submit", self._on_submit)
        listen(self.input, "keydown", self._on_keydown)
        listen(self.stop_button, "click", lambda _e: self.stop())
        listen(self.cancel_all_button, "click", lambda _e: self.cancel_all_queued())

    def enable(self):
        """The page is ready: the input takes messages."""
        self.input.disabled = False
        self.send_button.disabled = False
        self.input.placeholder = "Message tokenwire…"

    def focus(self):
        self.input.focus()

    # ---- the user's actions --------------------------------------------------------------

    def _on_keydown(self, event):
        if event.key == "Enter" and not event.shiftKey:
            event.preventDefault()
            self._submit()

    def _on_submit(self, event):
        event.preventDefault()
        self._submit()

    def _submit(self):
        text = str(self.input.value).strip()
        if not text:
            return
        self.input.value = ""
        self.send_message(text)

    def send_message(self, text, replacing=None):
        """Queue `text` for the conversation shown, show it, and send it when possible;
        `replacing` is the failed answer a Retry replaces."""
        id = new_id()
        conversation = self.current()
        self.outbox.add(id, conversation, text)
        self.save_outbox()
        if replacing is None:
            self.show_queued({"id": id, "text": text})
        self.session.track(id, conversation, 0, False)
        view = self.transcript.live_answer(id)
        view.user_text = text
        if replacing is not None:
            self.transcript.replace(replacing, view)
        self.transcript.to_bottom()
        self.update_controls()
        self.pump()

    def retry(self, view):
        """Retry an incomplete answer: the same text as a new request."""
        text = getattr(view, "user_text", "")
        if text:
            self.send_message(text, replacing=view)

    def stop(self):
        for stream in self.session.unfinished():
            if stream.conversation != self.current():
                continue
            if self.outbox.cancellable(stream.id):
                self.cancel_queued(stream.id)  # never sent: it never will be
            elif stream.id not in self.cancels:
                self.cancels.append(stream.id)
        self.send_cancels()

    def cancel_queued(self, id):
        if self.outbox.cancel(id) is None:
            return  # already sent (it may be stored): Stop is the way now
        self.save_outbox()
        self._drop_queued(id)
        self.update_controls()

    def cancel_all_queued(self):
        """Cancel every message of this conversation that is still waiting to be sent."""
        for id in self.outbox.cancel_conversation(self.current()):
            self._drop_queued(id)
        self.save_outbox()
        self.update_controls()

    def _drop_queued(self, id):
        self.transcript.drop(id)
        self.session.forget(id)

    def update_controls(self):
        """Stop shows while an answer of this conversation streams, "Cancel queued" while
        one of its messages can still be taken back."""
        conversation = self.current()
        streaming = [s for s in self.session.unfinished() if s.conversation == conversation]
        self.stop_button.hidden = not streaming
        cancellable = [
            m for m in self.outbox.pending(conversation) if self.outbox.cancellable(m["id"])
        ]
        self.cancel_all_button.hidden = len(cancellable) < 1

    # ---- cancels -------------------------------------------------------------------------

    def send_cancels(self):
        """Send the cancels the user asked for, once each can be: over an open connection,
        and only for a stream the server acked (a `cancel` of an id it has not seen yet is
        `not_found`, and would end the stream before its `chat` is resent)."""
        if not self.driver.is_open:
            return
        for id in list(self.cancels):
            stream = self.session.get(id)
            if stream is None or stream.status != STREAMING:
                self.cancels.remove(id)
            elif stream.acked:
                if self.driver.transport == "ws":
                    if self.driver.send(protocol.cancel(id)):
                        self.cancels.remove(id)
                else:
                    self.cancels.remove(id)
                    asyncio.create_task(self._post_cancel(id))

    async def _post_cancel(self, id):
        status, _ = await post_json("/api/streams/" + id + "/cancel", None)
        if status is None and id not in self.cancels:
            self.cancels.append(id)  # the network failed: again on the next connection

    def ended(self, id):
        """The stream `id` ended: nothing left to cancel."""
        if id in self.cancels:
            self.cancels.remove(id)
        self.update_controls()

    # ---- the offline queue -------------------------------------------------------------

    def save_outbox(self):
        storage_set(OUTBOX_KEY, self.outbox.dumps())

    def queued(self, conversation):
        """The conversation's messages still in the queue, in order."""
        return self.outbox.pending(conversation)

    def show_queued(self, m):
        """Show queued message `m` as pending, with a Cancel while it never went out."""
        id = m["id"]
        on_cancel = (lambda: self.cancel_queued(id)) if self.outbox.cancellable(id) else None
        return self.transcript.queued_message(id, m["text"], on_cancel)

    def send_waiting(self):
        """On a connection (or once it is usable): send the cancels, then the queue."""
        self.send_cancels()
        self.pump()

    def pump(self):
        """Send the next queued message, if connected and none is awaiting its ack."""
        if not self.driver.is_open:
            return
        m = self.outbox.next_to_send()
        if m is None:
            return
        if self.driver.transport == "ws":
            # Resent after a lost ack, the server replays only what is not shown yet.
            stream = self.session.get(m["id"])
            after = stream.last if stream is not None else 0
            if not self.driver.send(protocol.chat(m["id"], m["conversation"], m["text"], after)):
                return
            self.outbox.mark_sent(m["id"])
        else:
            self.outbox.mark_sent(m["id"])
            asyncio.create_task(self._post_chat(m))
        self.save_outbox()  # `tried` must survive a reload: it can no longer be cancelled
        self.transcript.sent(m["id"])
        self.update_controls()

    async def _post_chat(self, m):
        payload = {"id": m["id"], "conversation": m["conversation"], "text": m["text"]}
        status, body = await post_json("/api/chat", payload)
        if status in (200, 202):
            self.acked(m["id"])
            stream = self.session.get(m["id"])
            self.driver.open_source(m["id"], stream.last if stream is not None else 0)
        elif body is not None and body.get("type") == "error":
            self.driver.dispatch(body)
        else:
            self.outbox.failed(m["id"])  # the network failed: try again shortly
            later(RETRY_DELAY, self.pump)

    def acked(self, id):
        """The server stored message `id` (`ack`): it leaves the queue, the next one goes."""
        if self.outbox.acked(id) is not None:
            self.save_outbox()
        self.session.acked(id)
        self._unqueued(id)
        self.send_cancels()
        self.pump()

    def stored(self, id):
        """History shows the server has message `id`: its ack was lost with a connection."""
        self.outbox.acked(id)
        self.save_outbox()

    def requeued(self, frame):
        """An `error` frame for request `frame["id"]`: True if it is a queued message the
        server could not take now, sent again after the `retry_after` it asked for. A queued
        message refused for good leaves the queue (False, as for a request not queued)."""
        id = frame["id"]
        if not any(m["id"] == id for m in self.outbox.items):
            return False
        if frame.get("retryable"):
            self.outbox.failed(id)
            later(frame.get("retry_after") or RETRY_DELAY, self.pump)
            return True
        self.outbox.acked(id)  # refused for good: it will never be accepted
        self.save_outbox()
        self._unqueued(id)
        return False

    def _unqueued(self, id):
        self.transcript.unqueued(id)
        self.update_controls()

    def disconnected(self):
        """Nothing is in flight on a dead connection: all goes again on the next one."""
        self.outbox.disconnected()
