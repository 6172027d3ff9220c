"""The chat page: the parts wired together, and the frames they share handed to each.

- `ConnectionDriver` (driver.py): the WebSocket or SSE connection, reconnects, frames in
  and out;
- `Composer` (composer.py): the text box, Send, Stop, and the offline queue;
- `ConversationList` (conversations.py): the sidebar, and which conversation is shown;
- `Transcript` (view.py): the messages on the page;
- `Session` (tokenwire.core.session): the streams, their last `seq`, gaps and resumes.

`App` owns none of the DOM itself but #app's `data-ready`. What it does is what needs more
than one part: rendering a conversation's history with its live streams and queued
messages, acting on each server frame (docs/PROTOCOL.md "Server to client"), and resuming
and sending once connected.
"""

import asyncio

from pyscript import document
from pyscript.ffi import is_none

from tokenwire.browser.composer import Composer
from tokenwire.browser.conversations import ConversationList
from tokenwire.browser.driver import ConnectionDriver
from tokenwire.browser.view import Transcript, error_note
from tokenwire.core.session import DONE, FAILED, Session


class App:
    def __init__(self):
        self.session = Session()
        self.transcript = Transcript(lambda view: self.composer.retry(view))
        self.driver = ConnectionDriver(self.session, self._on_frame, self._on_open, self._on_closed)
        self.conversations = ConversationList(self._clear, self._render, self._resume_and_send)
        self.composer = Composer(
            self.session, self.transcript, self.driver, lambda: self.conversations.current
        )

    def start(self):
        self.composer.watch()
        self.conversations.watch()
        self.driver.watch()
        asyncio.create_task(self._boot())

    async def _boot(self):
        await self.conversations.refresh()
        await self.conversations.show(self.conversations.current)
        self.composer.enable()
        document.getElementById("app").setAttribute("data-ready", "true")
        self.composer.focus()
        self.driver.connect()

    # ---- the conversation shown ----------------------------------------------------------

    def _clear(self):
        """Forget what is shown: the streams in progress are resumed when shown again."""
        for stream in list(self.session.unfinished()):
            self.driver.close_source(stream.id)
            self.session.forget(stream.id)
        self.transcript.clear()

    def _render(self, conversation, body):
        """Render `conversation`: its history (`body`, None if there is none), its answers
        still streaming (resumed from the log), and its messages still queued."""
        self._clear()
        messages = body.get("messages", []) if body else []
        if body and body.get("title"):
            self.transcript.set_title(body["title"])
        answered = [m["id"] for m in messages if m["role"] == "assistant"]
        stored = [m["id"] for m in messages if m["role"] == "user"]
        for m in self.composer.queued(conversation):
            if m["id"] in stored:
                # The server has it, so it was acked (the ack was lost with a connection):
                # shown from history, never twice, and the queue moves on.
                self.composer.stored(m["id"])
        for m in messages:
            if m["role"] == "user":
                self.transcript.user(m["id"], m["text"])
                if m["id"] not in answered:
                    self._track(m["id"], conversation)  # still streaming: resume it
            else:
                view = self.transcript.answer(m["id"])
                view.append(m["text"])
                if m["complete"]:
                    view.finish(DONE)
                else:
                    view.finish(FAILED, "This answer is incomplete.", retry=True)
                view.user_text = _user_text(messages, m["id"])
        for m in self.composer.queued(conversation):
            self.composer.show_queued(m)
            self._track(m["id"], conversation, acked=False).user_text = m["text"]
        self.transcript.to_bottom()
        self.composer.update_controls()
        if self.driver.is_open:
            self._resume_and_send()

    def _track(self, id, conversation, acked=True):
        """Follow stream `id` from its first token, shown as a live answer."""
        self.session.track(id, conversation, 0, acked)
        return self.transcript.live_answer(id)

    # ---- the connection ------------------------------------------------------------------

    def _on_open(self):
        if self.conversations.shown_stale:
            asyncio.create_task(self.conversations.reload())  # it resumes and sends once loaded
            return
        if self.conversations.list_stale:
            asyncio.create_task(self.conversations.refresh())
        self._resume_and_send()

    def _resume_and_send(self):
        """On a connection: resume every unfinished stream, then send what waits."""
        self.driver.resume_streams()
        self.composer.send_waiting()

    def _on_closed(self):
        self.composer.disconnected()

    # ---- frames from the server (every type but `ping`, which the driver answers) --------

    def _on_frame(self, frame):
        kind = frame["type"]
        if kind == "ack":
            self.composer.acked(frame["id"])
        elif kind == "token":
            text, reply = self.session.on_token(frame)
            if text:
                self.transcript.append(frame["id"], text)
            if reply is not None:
                self.driver.send_or_reopen(reply)  # a gap: `resume`
        elif kind == "done":
            status, reply = self.session.on_done(frame)
            if reply is not None:
                self.driver.send_or_reopen(reply)
            if status is not None:
                self._end(frame["id"], status)
        elif kind == "error":
            self._on_error(frame)
        elif kind == "message":
            self._on_other_tab_message(frame)

    def _on_error(self, frame):
        id = frame.get("id")
        if is_none(id) or id is None:
            return
        if self.composer.requeued(frame):
            return
        status = self.session.on_error(frame)
        if status is not None:
            self._end(id, FAILED, error_note(frame))
        self.composer.pump()

    def _end(self, id, status, note=None):
        self.driver.close_source(id)
        self.transcript.end(id, status, note)
        self.composer.ended(id)
        asyncio.create_task(self.conversations.refresh())

    def _on_other_tab_message(self, frame):
        """A message sent from another tab or device: shown, and its answer followed, if
        it belongs to the conversation shown; otherwise only the list changes."""
        if frame["conversation"] != self.conversations.current or self.transcript.streaming(
            frame["id"]
        ):
            asyncio.create_task(self.conversations.refresh())
            return
        self.transcript.user(frame["id"], frame["text"])
        self._track(frame["id"], frame["conversation"]).user_text = frame["text"]
        self.composer.update_controls()
        self.transcript.to_bottom()


def _user_text(messages, id):
    """The text of user message `id` in a history (the question an answer answers)."""
    for m in messages:
        if m["id"] == id and m["role"] == "user":
            return m["text"]
    return ""
