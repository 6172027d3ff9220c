"""Messages on the page. Text only ever becomes DOM text nodes: no HTML from the model or
the user is ever parsed.

An assistant message streams: tokens are collected and, once per animation frame, fed to
the pure `MarkdownStream`, whose append-only operations are applied to the DOM. Nothing
already shown is rebuilt, so partial tokens ("Hel" + "lo") never flicker or shift.

`Transcript` is the conversation shown (#messages and its #title): its messages, and by id
the answers still streaming and the user's messages still queued. What is tracked, queued
or sent is the session's and the outbox's business, not this module's.
"""

from pyscript import document, window
from pyscript.ffi import create_proxy

from tokenwire.browser.web import listen
from tokenwire.core.markdown import MarkdownStream
from tokenwire.core.session import CANCELLED, FAILED

# What an answer ended by an error says, by error code (docs/PROTOCOL.md "Error codes").
NOTES = {
    "stream_expired": "This answer is incomplete: it is no longer available.",
    "provider_error": "The model failed before finishing this answer.",
    "shutting_down": "The server restarted before finishing this answer.",
    "not_found": "This answer is incomplete.",
}


def error_note(frame):
    """The note under an answer that the `error` frame `frame` ended."""
    return NOTES.get(frame["code"], "This message failed: " + frame["message"])


def element(tag, cls=None, text=None):
    node = document.createElement(tag)
    if cls:
        node.className = cls
    if text:
        node.textContent = text
    return node


class Scroller:
    """Keeps the message list pinned to the bottom while the user has not scrolled up."""

    def __init__(self, container):
        self.container = container

    def at_bottom(self):
        c = self.container
        return c.scrollHeight - c.scrollTop - c.clientHeight < 40

    def to_bottom(self):
        self.container.scrollTop = self.container.scrollHeight


class AssistantView:
    def __init__(self, container, id, scroller, on_retry=None):
        self.id = id
        self.root = element("div", "msg assistant streaming")
        self.root.setAttribute("data-id", id)
        self.body = element("div", "body")
        self.meta = element("div", "meta")
        self.meta.hidden = True
        self.root.appendChild(self.body)
        self.root.appendChild(self.meta)
        container.appendChild(self.root)
        self.scroller = scroller
        self.on_retry = on_retry
        self.user_text = ""  # the question, for Retry
        self.markdown = MarkdownStream()
        self.stack = [self.body]
        self.last_text = None  # (text node, its parent) the next text may extend
        self.pending = []
        self.text = ""  # everything shown, for tests and for copying
        self._frame_proxy = create_proxy(self._on_frame)
        self._frame_requested = False
        self._retry_proxy = None

    def append(self, text):
        self.pending.append(text)
        self.text += text
        if not self._frame_requested:
            self._frame_requested = True
            window.requestAnimationFrame(self._frame_proxy)

    def _on_frame(self, _timestamp=None):
        self._frame_requested = False
        if self.pending:
            chunk = "".join(self.pending)
            self.pending = []
            self._apply(self.markdown.feed(chunk))

    def flush(self):
        """Render everything now (at the end of the stream)."""
        self._on_frame()
        self._apply(self.markdown.finish())

    def _apply(self, ops):
        if not ops:
            return
        pinned = self.scroller.at_bottom()
        for op in ops:
            kind = op[0]
            if kind == "text":
                parent = self.stack[-1]
                if self.last_text is not None and self.last_text[1] is parent:
                    self.last_text[0].appendData(op[1])
                else:
                    node = document.createTextNode(op[1])
                    parent.appendChild(node)
                    self.last_text = (node, parent)
            elif kind == "open":
                node = element(op[1])
                if len(op) > 2 and op[2]:
                    node.setAttribute("data-lang", op[2])
                self.stack[-1].appendChild(node)
                self.stack.append(node)
                self.last_text = None
            elif kind == "close" and len(self.stack) > 1:
                self.stack.pop()
                self.last_text = None
        if pinned:
            self.scroller.to_bottom()

    def finish(self, status, note=None, retry=False):
        """The stream ended: final render, and a note when the answer is incomplete."""
        self.flush()
        self.root.classList.remove("streaming")
        self.root.setAttribute("data-status", status)
        if note:
            self.meta.textContent = note
            self.meta.hidden = False
            if retry and self.on_retry is not None:
                button = element("button", "retry", "Retry")
                button.type = "button"
                self._retry_proxy = create_proxy(lambda _event: self.on_retry(self))
                button.addEventListener("click", self._retry_proxy)
                self.meta.appendChild(button)

    def remove(self):
        self.root.remove()


def user_message(container, id, text, pending=False):
    """The user's message; its text in a `.text` child, beside any controls (Cancel)."""
    node = element("div", "msg user pending" if pending else "msg user")
    node.appendChild(element("span", "text", text))
    node.setAttribute("data-id", id)
    container.appendChild(node)
    return node


class Transcript:
    """The conversation shown, in the DOM: its title and messages, the answers still to
    stream by stream id (their tokens and their end go there) and the user's messages
    still queued by request id."""

    def __init__(self, on_retry):
        self.container = document.getElementById("messages")
        self.title = document.getElementById("title")
        self.scroller = Scroller(self.container)
        self.on_retry = on_retry  # called with the AssistantView whose Retry was clicked
        self.answers = {}  # stream id -> AssistantView still streaming (or to be sent)
        self.queued = {}  # request id -> the user message shown as pending

    def clear(self):
        self.container.replaceChildren()
        self.answers = {}
        self.queued = {}
        self.title.textContent = "tokenwire"

    def set_title(self, text):
        self.title.textContent = text

    def user(self, id, text):
        return user_message(self.container, id, text)

    def queued_message(self, id, text, on_cancel=None):
        """A user message waiting in the queue; with a Cancel button if `on_cancel`."""
        node = user_message(self.container, id, text, pending=True)
        if on_cancel is not None:
            cancel = element("button", "cancel-queued", "Cancel")
            cancel.type = "button"
            listen(cancel, "click", lambda _e: on_cancel())
            node.appendChild(cancel)
        self.queued[id] = node
        return node

    def answer(self, id):
        """An answer from history, shown as it is."""
        return AssistantView(self.container, id, self.scroller, self.on_retry)

    def live_answer(self, id):
        """An answer still to stream: its tokens and its end find it by `id`."""
        view = self.answer(id)
        self.answers[id] = view
        return view

    def streaming(self, id):
        """Whether stream `id` is one of the answers shown here."""
        return id in self.answers

    def append(self, id, text):
        """Text of stream `id`, if it is shown here."""
        view = self.answers.get(id)
        if view is not None:
            view.append(text)

    def replace(self, old, new):
        """`new` takes the place of the answer `old` (Retry)."""
        self.container.insertBefore(new.root, old.root)
        old.remove()

    def sent(self, id):
        """The message went on the wire: it can no longer be taken back."""
        node = self.queued.get(id)
        if node is not None:
            for button in node.querySelectorAll(".cancel-queued"):
                button.remove()

    def unqueued(self, id):
        """The message left the queue (stored, or refused for good): no longer pending."""
        self.sent(id)
        node = self.queued.pop(id, None)
        if node is not None:
            node.classList.remove("pending")

    def drop(self, id):
        """A queued message was cancelled: it leaves the page, and so does its answer."""
        node = self.queued.pop(id, None)
        if node is not None:
            node.remove()
        view = self.answers.pop(id, None)
        if view is not None:
            view.remove()

    def end(self, id, status, note=None):
        """The stream `id` ended with `status` (a note and Retry when it failed)."""
        view = self.answers.get(id)
        if view is None:
            return
        if status == CANCELLED:
            view.finish(status, "Stopped.")
        elif status == FAILED:
            view.finish(status, note or "This answer is incomplete.", retry=True)
        else:
            view.finish(status)

    def to_bottom(self):
        self.scroller.to_bottom()
