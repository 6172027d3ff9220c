"""Messages on the page. Text only ever becomes DOM text nodes: no HTML from the model or
the user is ever parsed.

An assistant message streams: tokens are collected and, once per animation frame, fed to
the pure `MarkdownStream`, whose append-only operations are applied to the DOM. Nothing
already shown is rebuilt, so partial tokens ("Hel" + "lo") never flicker or shift.
"""

from pyscript import document, window
from pyscript.ffi import create_proxy

from tokenwire.core.markdown import MarkdownStream


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
