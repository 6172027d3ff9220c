"""The chat page: the pure cores (session, outbox, connection, markdown) wired to the DOM,
the WebSocket, the SSE fallback, localStorage, timers and window events.

JavaScript exceptions thrown by synchronous calls cannot be caught in MicroPython
(FIELD-NOTES.md), so every risky call is guarded instead: `send` only on an OPEN socket,
JSON parsed in Python, URLs built from `location`, storage values checked with
`is_none` (Pyodide returns `jsnull` where MicroPython returns None).
"""

import asyncio
import json

from pyscript import document, fetch, window
from pyscript.ffi import create_proxy, is_none

from tokenwire.browser.view import AssistantView, Scroller, element, user_message
from tokenwire.core import protocol
from tokenwire.core.connection import Connection
from tokenwire.core.outbox import QUEUED, Outbox
from tokenwire.core.session import CANCELLED, DONE, FAILED, Session

OUTBOX_KEY = "tokenwire.outbox"
CURRENT_KEY = "tokenwire.conversation"
WS_OPEN = 1
RETRY_DELAY = 2.0  # seconds before resending a chat the server asked us to retry

NOTES = {
    "stream_expired": "This answer is incomplete: it is no longer available.",
    "provider_error": "The model failed before finishing this answer.",
    "shutting_down": "The server restarted before finishing this answer.",
    "not_found": "This answer is incomplete.",
}


def now():
    return window.performance.now() / 1000.0


def new_id():
    return str(window.crypto.randomUUID()).replace("-", "")


def storage_get(key):
    value = window.localStorage.getItem(key)
    return None if is_none(value) else str(value)


def storage_set(key, value):
    window.localStorage.setItem(key, value)


def later(seconds, callback):
    """Run `callback` after `seconds` (a JS timer; the proxy lives as long as it must)."""
    holder = []

    def fire(*_args):
        holder.clear()
        callback()

    proxy = create_proxy(fire)
    holder.append(proxy)
    window.setTimeout(proxy, int(seconds * 1000))


class App:
    def __init__(self):
        self.messages = document.getElementById("messages")
        self.input = document.getElementById("input")
        self.send_button = document.getElementById("send")
        self.stop_button = document.getElementById("stop")
        self.status = document.getElementById("status")
        self.title = document.getElementById("title")
        self.conversations = document.getElementById("conversations")
        self.scroller = Scroller(self.messages)
        self.session = Session()
        self.outbox = Outbox()
        self.outbox.loads(storage_get(OUTBOX_KEY))
        self.conn = Connection(lambda: window.Math.random())
        self.current = storage_get(CURRENT_KEY) or new_id()
        self.views = {}  # stream id -> AssistantView of the current conversation
        self.known = []  # conversations the server has
        self.pending_nodes = {}  # request id -> the user message shown as pending
        self.ws = None
        self.ws_generation = 0
        self.sources = {}  # stream id -> EventSource, in SSE mode
        self._source_proxies = {}
        self._ws_handlers = []
        self._proxies = []

    # ---- start -------------------------------------------------------------------------

    def start(self):
        self._listen(document.getElementById("composer"), "submit", self._on_submit)
        self._listen(self.input, "keydown", self._on_keydown)
        self._listen(self.stop_button, "click", lambda _e: self.stop())
        self._listen(document.getElementById("new-chat"), "click", lambda _e: self.new_chat())
        # MicroPython calls window.addEventListener with the wrong `this` ("Illegal
        # invocation"); the same window reached as document.defaultView works in both.
        self._listen(
            document.defaultView, "online", lambda _e: self._decide(self.conn.online(now()))
        )
        tick = create_proxy(lambda *_a: self._tick())
        self._proxies.append(tick)
        window.setInterval(tick, 1000)
        asyncio.create_task(self._boot())

    async def _boot(self):
        await self.refresh_conversations()
        await self.show(self.current)
        self.input.disabled = False
        self.send_button.disabled = False
        self.input.placeholder = "Message tokenwire…"
        document.getElementById("app").setAttribute("data-ready", "true")
        self.input.focus()
        self._decide(self.conn.start(now()))

    def _listen(self, target, event, handler):
        proxy = create_proxy(handler)
        self._proxies.append(proxy)
        target.addEventListener(event, proxy)

    # ---- conversations ---------------------------------------------------------------

    async def refresh_conversations(self):
        body = await self._get_json("/api/conversations")
        if body is None:
            return
        self.conversations.replaceChildren()
        listed = False
        self.known = [c["conversation"] for c in body.get("conversations", [])]
        for c in body.get("conversations", []):
            self._conversation_link(c["conversation"], c["title"] or "New chat")
            listed = listed or c["conversation"] == self.current
        if not listed:
            link = self._conversation_link(self.current, "New chat")
            self.conversations.prepend(link)

    def _conversation_link(self, conversation, title):
        link = element("a", "current" if conversation == self.current else None, title)
        link.href = "#" + conversation
        link.setAttribute("data-conversation", conversation)

        def open_it(event):
            event.preventDefault()
            asyncio.create_task(self.switch(conversation))

        self._listen(link, "click", open_it)
        self.conversations.appendChild(link)
        return link

    def new_chat(self):
        asyncio.create_task(self.switch(new_id()))

    async def switch(self, conversation):
        if conversation == self.current:
            return
        await self.show(conversation)
        await self.refresh_conversations()

    async def show(self, conversation):
        """Render a conversation: its history, its answers still streaming (resumed from
        the log), and its messages still queued."""
        for stream in list(self.session.unfinished()):
            self._close_source(stream.id)
            self.session.forget(stream.id)
        self.current = conversation
        storage_set(CURRENT_KEY, conversation)
        self.messages.replaceChildren()
        self.views = {}
        self.pending_nodes = {}
        self.title.textContent = "tokenwire"
        body = None
        if conversation in self.known:  # a new conversation has no history to load
            body = await self._get_json("/api/conversations/" + conversation)
        if self.current != conversation:
            return  # the user moved on while we loaded
        messages = body.get("messages", []) if body else []
        if body and body.get("title"):
            self.title.textContent = body["title"]
        answered = [m["id"] for m in messages if m["role"] == "assistant"]
        queued = [m["id"] for m in self.outbox.pending(conversation)]
        for m in messages:
            if m["role"] == "user":
                user_message(self.messages, m["id"], m["text"])
                if m["id"] not in answered and m["id"] not in queued:
                    self._track(m["id"], conversation)  # still streaming: resume it
            else:
                view = AssistantView(self.messages, m["id"], self.scroller, self._retry)
                view.append(m["text"])
                if m["complete"]:
                    view.finish(DONE)
                else:
                    view.finish(FAILED, "This answer is incomplete.", retry=True)
                view.user_text = self._user_text(messages, m["id"])
        for m in self.outbox.pending(conversation):
            self.pending_nodes[m["id"]] = self._pending_message(m)
            self._track(m["id"], conversation).user_text = m["text"]
        self.scroller.to_bottom()
        self._update_controls()
        if self.conn.state == "open":
            for frame in self.session.resume_frames():
                self._send_or_reopen(frame)

    def _user_text(self, messages, id):
        for m in messages:
            if m["id"] == id and m["role"] == "user":
                return m["text"]
        return ""

    def _pending_message(self, m):
        node = user_message(self.messages, m["id"], m["text"], pending=True)
        cancel = element("button", "cancel-queued", "Cancel")
        cancel.type = "button"
        self._listen(cancel, "click", lambda _e: self.cancel_queued(m["id"]))
        node.appendChild(cancel)
        return node

    def _track(self, id, conversation):
        self.session.track(id, conversation, 0)
        view = AssistantView(self.messages, id, self.scroller, self._retry)
        self.views[id] = view
        return view

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
        id = new_id()
        self.outbox.add(id, self.current, text)
        self._save_outbox()
        if replacing is None:
            self.pending_nodes[id] = self._pending_message({"id": id, "text": text})
        view = self._track(id, self.current)
        view.user_text = text
        if replacing is not None:
            self.messages.insertBefore(view.root, replacing.root)
            replacing.remove()
        self.scroller.to_bottom()
        self._update_controls()
        self._pump()

    def _retry(self, view):
        """Retry an incomplete answer: the same text as a new request."""
        text = getattr(view, "user_text", "")
        if text:
            self.send_message(text, replacing=view)

    def stop(self):
        for stream in self.session.unfinished():
            if stream.conversation != self.current:
                continue
            queued = [m for m in self.outbox.items if m["id"] == stream.id]
            if queued and queued[0]["state"] == QUEUED:
                # Never sent: it never will be.
                self.cancel_queued(stream.id)
                continue
            if self.conn.transport == "ws":
                self._send(protocol.cancel(stream.id))
            else:
                asyncio.create_task(self._post("/api/streams/" + stream.id + "/cancel", None))

    def cancel_queued(self, id):
        if self.outbox.acked(id) is None:
            return  # already sent: Stop is the way now
        self._save_outbox()
        node = self.pending_nodes.pop(id, None)
        if node is not None:
            node.remove()
        view = self.views.pop(id, None)
        if view is not None:
            view.remove()
        self.session.forget(id)
        self._update_controls()

    def _update_controls(self):
        streaming = [s for s in self.session.unfinished() if s.conversation == self.current]
        self.stop_button.hidden = not streaming

    # ---- connection --------------------------------------------------------------------

    def _decide(self, decision):
        if decision is None:
            self._show_status()
            return
        if decision[0] == "drop":
            self._abandon_ws()
            return
        _, delay, transport = decision
        self._show_status()
        if delay <= 0:
            self._open(transport)
        else:
            later(delay, lambda: self._open(transport))

    def _show_status(self):
        self.status.hidden = not self.conn.reconnecting

    def _tick(self):
        if self.conn.transport == "ws":
            self._decide(self.conn.tick(now()))
        else:
            retry = self.conn.retry_ws(now())
            if retry is not None:
                self._decide(retry)

    def _open(self, transport):
        if self.conn.state == "open":
            return  # the `online` event and a timer both asked: one connection is enough
        if transport == "ws":
            self._open_ws()
        else:
            asyncio.create_task(self._open_sse())

    def _open_ws(self):
        self._abandon_ws(report=False)
        scheme = "wss://" if window.location.protocol == "https:" else "ws://"
        ws = window.WebSocket.new(scheme + window.location.host + "/ws")
        self.ws_generation += 1
        generation = self.ws_generation

        def current():
            return generation == self.ws_generation

        def on_open(_event):
            if current():
                self._opened()

        def on_message(event):
            if current():
                self._on_text(event.data)

        def on_close(event):
            if current():
                self.ws = None
                self._closed(event.code)

        handlers = [create_proxy(on_open), create_proxy(on_message), create_proxy(on_close)]
        ws.onopen, ws.onmessage, ws.onclose = handlers
        self.ws = ws
        self._ws_handlers = handlers

    def _abandon_ws(self, report=True):
        """Stop using the socket now (the watchdog found it dead, or a new one replaces it);
        its late events are ignored by generation."""
        ws = self.ws
        if ws is None:
            return
        self.ws = None
        self.ws_generation += 1
        if ws.readyState <= WS_OPEN:
            ws.close()
        if report:
            self._closed(4000)

    def _opened(self):
        self.conn.opened(now())
        self._show_status()
        if self.conn.transport == "ws":
            self._close_all_sources()
        for frame in self.session.resume_frames():
            self._send_or_reopen(frame)
        self._pump()

    def _closed(self, code):
        self.outbox.disconnected()
        self._decide(self.conn.closed(now(), code))

    def _send(self, frame):
        ws = self.ws
        if ws is None or ws.readyState != WS_OPEN:
            return False  # sending on a connecting or closing socket throws, uncatchably
        ws.send(protocol.encode(frame))
        return True

    def _send_or_reopen(self, frame):
        """A resume: over the WebSocket, or in SSE mode by reopening the stream's source."""
        if self.conn.transport == "ws":
            self._send(frame)
        else:
            self._open_source(frame["id"], frame["after"])

    # ---- frames --------------------------------------------------------------------------

    def _on_text(self, text):
        frame = protocol.decode(text)
        if frame is None:
            return  # not a frame we understand: never fatal
        if frame["type"] == "hello":
            self.conn.frame(now(), frame["heartbeat"], frame.get("heartbeat_timeout"))
        else:
            self.conn.frame(now())
        self.on_frame(frame)

    def on_frame(self, frame):
        kind = frame["type"]
        if kind == "ping":
            self._send(protocol.pong(frame["t"]))
        elif kind == "ack":
            self._acked(frame["id"])
        elif kind == "token":
            text, reply = self.session.on_token(frame)
            if text:
                view = self.views.get(frame["id"])
                if view is not None:
                    view.append(text)
            if reply is not None:
                self._send_or_reopen(reply)
        elif kind == "done":
            status, reply = self.session.on_done(frame)
            if reply is not None:
                self._send_or_reopen(reply)
            if status is not None:
                self._end(frame["id"], status)
        elif kind == "error":
            self._on_error(frame)
        elif kind == "message":
            self._on_other_tab_message(frame)

    def _acked(self, id):
        if self.outbox.acked(id) is not None:
            self._save_outbox()
        node = self.pending_nodes.pop(id, None)
        if node is not None:
            node.classList.remove("pending")
            for button in node.querySelectorAll(".cancel-queued"):
                button.remove()
        self._pump()

    def _on_error(self, frame):
        id = frame.get("id")
        if is_none(id) or id is None:
            return
        if any(m["id"] == id for m in self.outbox.items):
            if frame.get("retryable"):
                self.outbox.failed(id)
                delay = frame.get("retry_after") or RETRY_DELAY
                later(delay, self._pump)
                return
            self.outbox.acked(id)  # refused for good: it will never be accepted
            self._save_outbox()
        status = self.session.on_error(frame)
        if status is not None:
            note = NOTES.get(frame["code"], "This message failed: " + frame["message"])
            self._end(id, FAILED, note)
        self._pump()

    def _end(self, id, status, note=None):
        self._close_source(id)
        view = self.views.get(id)
        if view is not None:
            if status == CANCELLED:
                view.finish(status, "Stopped.")
            elif status == FAILED:
                view.finish(status, note or "This answer is incomplete.", retry=True)
            else:
                view.finish(status)
        self._update_controls()
        asyncio.create_task(self.refresh_conversations())

    def _on_other_tab_message(self, frame):
        if frame["conversation"] != self.current or frame["id"] in self.views:
            asyncio.create_task(self.refresh_conversations())
            return
        user_message(self.messages, frame["id"], frame["text"])
        self._track(frame["id"], frame["conversation"]).user_text = frame["text"]
        self._update_controls()
        self.scroller.to_bottom()

    # ---- the offline queue -------------------------------------------------------------

    def _save_outbox(self):
        storage_set(OUTBOX_KEY, self.outbox.dumps())

    def _pump(self):
        """Send the next queued message, if connected and none is awaiting its ack."""
        if self.conn.state != "open":
            return
        m = self.outbox.next_to_send()
        if m is None:
            return
        if self.conn.transport == "ws":
            if self._send(protocol.chat(m["id"], m["conversation"], m["text"])):
                self.outbox.mark_sent(m["id"])
        else:
            self.outbox.mark_sent(m["id"])
            asyncio.create_task(self._post_chat(m))

    # ---- SSE fallback --------------------------------------------------------------------

    async def _open_sse(self):
        body = await self._get_json("/readyz")
        if body is None:
            self._closed(None)
            return
        self._opened()

    async def _post_chat(self, m):
        payload = {"id": m["id"], "conversation": m["conversation"], "text": m["text"]}
        status, body = await self._post("/api/chat", payload)
        if status in (200, 202):
            self._acked(m["id"])
            self._open_source(m["id"], 0)
        elif body is not None and body.get("type") == "error":
            self.on_frame(body)
        else:
            self.outbox.failed(m["id"])  # the network failed: try again shortly
            later(RETRY_DELAY, self._pump)

    def _open_source(self, id, after):
        self._close_source(id)
        source = window.EventSource.new("/api/streams/" + id + "?after=" + str(after))

        def on_event(event):
            frame = protocol.decode(event.data)
            if frame is not None:
                self.conn.frame(now())
                self.on_frame(frame)

        def on_error(_event):
            # EventSource retries network errors by itself (readyState CONNECTING); it
            # gives up (CLOSED) only when the server refused the stream (404, 410).
            if source.readyState == 2 and self.sources.get(id) is source:
                self.on_frame(
                    {"type": "error", "id": id, "code": "stream_expired", "message": "gone"}
                )

        proxies = [create_proxy(on_event), create_proxy(on_error)]
        for name in ("token", "done", "error"):
            source.addEventListener(name, proxies[0])
        source.onerror = proxies[1]
        self._source_proxies[id] = proxies  # the proxies live as long as the source
        self.sources[id] = source

    def _close_source(self, id):
        source = self.sources.pop(id, None)
        self._source_proxies.pop(id, None)
        if source is not None:
            source.close()

    def _close_all_sources(self):
        for id in list(self.sources):
            self._close_source(id)

    # ---- HTTP ----------------------------------------------------------------------------

    async def _get_json(self, url):
        try:
            response = await fetch(url, credentials="same-origin")
            text = await response.text()
        except Exception:  # a network failure rejects the promise: offline
            return None
        if not response.ok:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return None

    async def _post(self, url, payload):
        try:
            response = await fetch(
                url,
                method="POST",
                credentials="same-origin",
                headers={"Content-Type": "application/json"},
                body=json.dumps(payload) if payload is not None else "",
            )
            text = await response.text()
        except Exception:
            return None, None
        try:
            return response.status, json.loads(text) if text else None
        except ValueError:
            return response.status, None
