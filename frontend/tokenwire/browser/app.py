"""The chat page: the pure cores (session, outbox, connection, markdown) wired to the DOM,
the WebSocket, the SSE fallback, localStorage, timers and window events.

JavaScript exceptions thrown by synchronous calls cannot be caught in MicroPython
(FIELD-NOTES.md), so every risky call is guarded instead: `send` only on an OPEN socket,
JSON parsed in Python, URLs built from `location`, storage values checked with
`is_none` (Pyodide returns `jsnull` where MicroPython returns None).

Connection attempts are numbered: a decision carried out later (a backoff timer, a
reachability probe) is dropped if a newer attempt began meanwhile (the `online` event,
say), so two attempts never race. Every HTTP request has a deadline: on a black-holed
network nothing ever fails by itself.
"""

import asyncio
import json

import js
from pyscript import document, window
from pyscript.ffi import create_proxy, is_none

from tokenwire.browser.view import AssistantView, Scroller, element, user_message
from tokenwire.core import protocol
from tokenwire.core.connection import Connection
from tokenwire.core.outbox import Outbox
from tokenwire.core.session import CANCELLED, DONE, FAILED, STREAMING, Session

OUTBOX_KEY = "tokenwire.outbox"
CURRENT_KEY = "tokenwire.conversation"
WS_OPEN = 1
SOURCE_CONNECTING = 0  # EventSource.readyState while it reconnects by itself
SOURCE_CLOSED = 2
RETRY_DELAY = 2.0  # seconds before resending a chat the server asked us to retry
HTTP_TIMEOUT = 10.0  # seconds any HTTP request may take
PROBE_TIMEOUT = 3.0  # seconds for the reachability probe after a failed WebSocket attempt

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


def http(url, method="GET", body=None, timeout=HTTP_TIMEOUT, signal=None):
    """The browser's `fetch` (a promise), with a deadline: on a black-holed network a
    request never fails by itself. The options are a JS object built here: PyScript's
    `fetch` sends its keyword arguments through JSON under MicroPython, which cannot carry
    an AbortSignal."""
    init = js.Object.new()
    init.method = method
    init.credentials = "same-origin"
    init.cache = "no-store"
    if body is not None:
        headers = js.Headers.new()
        headers.set("Content-Type", "application/json")
        init.headers = headers
        init.body = body
    init.signal = signal if signal is not None else js.AbortSignal.timeout(int(timeout * 1000))
    return js.fetch(url, init)


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
        self.cancel_all_button = document.getElementById("cancel-queued")
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
        self.attempt = 0  # numbers connection attempts; see the module docstring
        self.list_stale = False  # the conversation list could not be loaded (offline)
        self.stale = False  # nor could the shown conversation: load both once connected
        self.cancels = []  # streams the user stopped while the cancel could not be sent
        self.sources = {}  # stream id -> EventSource, in SSE mode
        self.sources_down = []  # streams whose EventSource is reconnecting
        self._source_proxies = {}
        self._ws_handlers = []
        self._proxies = []

    # ---- start -------------------------------------------------------------------------

    def start(self):
        self._listen(document.getElementById("composer"), "submit", self._on_submit)
        self._listen(self.input, "keydown", self._on_keydown)
        self._listen(self.stop_button, "click", lambda _e: self.stop())
        self._listen(document.getElementById("new-chat"), "click", lambda _e: self.new_chat())
        self._listen(self.cancel_all_button, "click", lambda _e: self.cancel_all_queued())
        # MicroPython calls window.addEventListener with the wrong `this` ("Illegal
        # invocation"); the same window reached as document.defaultView works in both.
        self._listen(
            document.defaultView, "online", lambda _e: self._decide(self.conn.online(now()))
        )
        self._listen(
            document.defaultView, "offline", lambda _e: self._decide(self.conn.offline(now()))
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
        self.list_stale = body is None  # offline: load again once connected
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
        """Show a conversation: cleared at once, then rendered from its history (when the
        history cannot be loaded, from the queue alone, and again once connected)."""
        self.current = conversation
        storage_set(CURRENT_KEY, conversation)
        self._clear()
        status, body = None, None
        # A new conversation has no history to load; offline, we cannot know it is new.
        if conversation in self.known or self.list_stale:
            status, body = await self._fetch_json("/api/conversations/" + conversation)
        if self.current != conversation:
            return  # the user moved on while we loaded
        self.stale = status is None and (conversation in self.known or self.list_stale)
        self._render(conversation, body if status == 200 else None)

    async def _reload(self):
        """Connected again after loading offline: load what could not be loaded. The shown
        conversation is rendered again only once its history is in hand, so a failure
        never wipes what is shown."""
        if self.list_stale:
            await self.refresh_conversations()
        conversation = self.current
        status, body = await self._fetch_json("/api/conversations/" + conversation)
        if self.current != conversation:
            return
        if status is None:
            self._resume_and_send()  # still unreachable: carry on with what is shown
            return
        self.stale = False
        self._render(conversation, body if status == 200 else None)

    def _clear(self):
        """Forget what is shown: the streams in progress are resumed when shown again."""
        for stream in list(self.session.unfinished()):
            self._close_source(stream.id)
            self.session.forget(stream.id)
        self.messages.replaceChildren()
        self.views = {}
        self.pending_nodes = {}
        self.title.textContent = "tokenwire"

    def _render(self, conversation, body):
        """Render `conversation`: its history (`body`, None if there is none), its answers
        still streaming (resumed from the log), and its messages still queued."""
        self._clear()
        messages = body.get("messages", []) if body else []
        if body and body.get("title"):
            self.title.textContent = body["title"]
        answered = [m["id"] for m in messages if m["role"] == "assistant"]
        stored = [m["id"] for m in messages if m["role"] == "user"]
        for m in self.outbox.pending(conversation):
            if m["id"] in stored:
                # The server has it, so it was acked (the ack was lost with a connection):
                # shown from history, never twice, and the queue moves on.
                self.outbox.acked(m["id"])
                self._save_outbox()
        for m in messages:
            if m["role"] == "user":
                user_message(self.messages, m["id"], m["text"])
                if m["id"] not in answered:
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
            self._track(m["id"], conversation, acked=False).user_text = m["text"]
        self.scroller.to_bottom()
        self._update_controls()
        if self.conn.state == "open":
            self._resume_and_send()

    def _user_text(self, messages, id):
        for m in messages:
            if m["id"] == id and m["role"] == "user":
                return m["text"]
        return ""

    def _pending_message(self, m):
        node = user_message(self.messages, m["id"], m["text"], pending=True)
        if self.outbox.cancellable(m["id"]):
            cancel = element("button", "cancel-queued", "Cancel")
            cancel.type = "button"
            self._listen(cancel, "click", lambda _e: self.cancel_queued(m["id"]))
            node.appendChild(cancel)
        return node

    def _remove_cancel_button(self, id):
        """The message went on the wire: it can no longer be taken back."""
        node = self.pending_nodes.get(id)
        if node is not None:
            for button in node.querySelectorAll(".cancel-queued"):
                button.remove()

    def _track(self, id, conversation, acked=True):
        self.session.track(id, conversation, 0, acked)
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
        view = self._track(id, self.current, acked=False)
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
            if self.outbox.cancellable(stream.id):
                self.cancel_queued(stream.id)  # never sent: it never will be
            elif stream.id not in self.cancels:
                self.cancels.append(stream.id)
        self._send_cancels()

    def _send_cancels(self):
        """Send the cancels the user asked for, once each can be: over an open connection,
        and only for a stream the server acked (a `cancel` of an id it has not seen yet is
        `not_found`, and would end the stream before its `chat` is resent)."""
        if self.conn.state != "open":
            return
        for id in list(self.cancels):
            stream = self.session.get(id)
            if stream is None or stream.status != STREAMING:
                self.cancels.remove(id)
            elif stream.acked:
                if self.conn.transport == "ws":
                    if self._send(protocol.cancel(id)):
                        self.cancels.remove(id)
                else:
                    self.cancels.remove(id)
                    asyncio.create_task(self._post_cancel(id))

    async def _post_cancel(self, id):
        status, _ = await self._post("/api/streams/" + id + "/cancel", None)
        if status is None and id not in self.cancels:
            self.cancels.append(id)  # the network failed: again on the next connection

    def cancel_queued(self, id):
        if self.outbox.cancel(id) is None:
            return  # already sent (it may be stored): Stop is the way now
        self._save_outbox()
        self._drop_queued(id)
        self._update_controls()

    def cancel_all_queued(self):
        """Cancel every message of this conversation that is still waiting to be sent."""
        for id in self.outbox.cancel_conversation(self.current):
            self._drop_queued(id)
        self._save_outbox()
        self._update_controls()

    def _drop_queued(self, id):
        node = self.pending_nodes.pop(id, None)
        if node is not None:
            node.remove()
        view = self.views.pop(id, None)
        if view is not None:
            view.remove()
        self.session.forget(id)

    def _update_controls(self):
        streaming = [s for s in self.session.unfinished() if s.conversation == self.current]
        self.stop_button.hidden = not streaming
        cancellable = [
            m for m in self.outbox.pending(self.current) if self.outbox.cancellable(m["id"])
        ]
        self.cancel_all_button.hidden = len(cancellable) < 1

    # ---- connection --------------------------------------------------------------------

    def _decide(self, decision):
        if decision is None:
            self._show_status()
            return
        if decision[0] == "drop":
            self._abandon_ws()
            return
        _, delay, transport = decision
        self.attempt += 1
        attempt = self.attempt
        self._show_status()
        if delay <= 0:
            self._open(transport)
        else:
            later(delay, lambda: self._open(transport) if attempt == self.attempt else None)

    def _show_status(self):
        self.status.hidden = not (self.conn.reconnecting or self.sources_down)

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

        opened = []

        def on_open(_event):
            if current():
                opened.append(True)
                self._opened()

        def on_message(event):
            if current():
                self._on_text(event.data)

        def on_close(event):
            if current():
                self.ws = None
                self._closed(event.code, probe=not opened)

        handlers = [create_proxy(on_open), create_proxy(on_message), create_proxy(on_close)]
        ws.onopen, ws.onmessage, ws.onclose = handlers
        self.ws = ws
        self._ws_handlers = handlers

    def _abandon_ws(self, report=True):
        """Stop using the socket now (the watchdog found it dead, the browser went offline,
        the attempt took too long, or a new one replaces it); its late events are ignored
        by generation."""
        ws = self.ws
        if ws is None:
            return
        self.ws = None
        self.ws_generation += 1
        never_opened = self.conn.state != "open"
        if ws.readyState <= WS_OPEN:
            ws.close()
        if report:
            self._closed(4000, probe=never_opened)

    def _opened(self):
        self.conn.opened(now())
        self._show_status()
        document.getElementById("app").setAttribute("data-transport", self.conn.transport)
        if self.conn.transport == "ws":
            self._close_all_sources()
        if self.stale:
            asyncio.create_task(self._reload())  # it resumes and sends once loaded
        elif self.list_stale:
            asyncio.create_task(self.refresh_conversations())
            self._resume_and_send()
        else:
            self._resume_and_send()

    def _resume_and_send(self):
        """On a connection: resume every unfinished stream, then send what waits."""
        for frame in self.session.resume_frames():
            self._send_or_reopen(frame)
        self._send_cancels()
        self._pump()

    def _closed(self, code, probe=False):
        """The connection is gone (or an attempt failed). A WebSocket attempt that never
        opened first asks whether the server answers plain HTTP at all: only if it does is
        WebSocket to blame (and, after a few such failures, replaced by SSE)."""
        self.outbox.disconnected()
        if probe and self.conn.transport == "ws":
            asyncio.create_task(self._probe_then_closed(code, self.attempt))
            return
        self._decide(self.conn.closed(now(), code))

    async def _probe_then_closed(self, code, attempt):
        reachable = await self._get_json("/healthz", PROBE_TIMEOUT) is not None
        if attempt == self.attempt:  # no newer attempt began while we asked
            self._decide(self.conn.closed(now(), code, reachable))

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
            node = frame.get("node")
            if isinstance(node, str):  # which server node serves the page (tests, support)
                document.getElementById("app").setAttribute("data-node", node)
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
        self.session.acked(id)
        self._unqueued(id)
        self._send_cancels()
        self._pump()

    def _unqueued(self, id):
        """The message left the queue (stored, or refused for good): no longer pending."""
        self._remove_cancel_button(id)
        node = self.pending_nodes.pop(id, None)
        if node is not None:
            node.classList.remove("pending")
        self._update_controls()

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
            self._unqueued(id)
        status = self.session.on_error(frame)
        if status is not None:
            note = NOTES.get(frame["code"], "This message failed: " + frame["message"])
            self._end(id, FAILED, note)
        self._pump()

    def _end(self, id, status, note=None):
        self._close_source(id)
        if id in self.cancels:
            self.cancels.remove(id)
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
            # Resent after a lost ack, the server replays only what is not shown yet.
            stream = self.session.get(m["id"])
            after = stream.last if stream is not None else 0
            if not self._send(protocol.chat(m["id"], m["conversation"], m["text"], after)):
                return
            self.outbox.mark_sent(m["id"])
        else:
            self.outbox.mark_sent(m["id"])
            asyncio.create_task(self._post_chat(m))
        self._save_outbox()  # `tried` must survive a reload: it can no longer be cancelled
        self._remove_cancel_button(m["id"])
        self._update_controls()

    # ---- SSE fallback --------------------------------------------------------------------

    async def _open_sse(self):
        attempt = self.attempt
        body = await self._get_json("/readyz")
        if attempt != self.attempt:
            return  # a newer attempt began meanwhile
        if body is None:
            self._closed(None)
            return
        self._opened()

    async def _post_chat(self, m):
        payload = {"id": m["id"], "conversation": m["conversation"], "text": m["text"]}
        status, body = await self._post("/api/chat", payload)
        if status in (200, 202):
            self._acked(m["id"])
            stream = self.session.get(m["id"])
            self._open_source(m["id"], stream.last if stream is not None else 0)
        elif body is not None and body.get("type") == "error":
            self.on_frame(body)
        else:
            self.outbox.failed(m["id"])  # the network failed: try again shortly
            later(RETRY_DELAY, self._pump)

    def _open_source(self, id, after):
        self._close_source(id)
        source = window.EventSource.new("/api/streams/" + id + "?after=" + str(after))

        def on_event(event):
            # The EventSource's own network errors are "error" events too, without data:
            # they are `on_error`'s business.
            data = getattr(event, "data", None)
            if self.sources.get(id) is not source or not isinstance(data, str):
                return
            self._source_up(id)
            frame = protocol.decode(data)
            if frame is not None:
                self.conn.frame(now())
                self.on_frame(frame)

        def on_error(_event):
            if self.sources.get(id) is not source:
                return
            if source.readyState == SOURCE_CONNECTING:
                # It reconnects by itself, resuming after Last-Event-ID; meanwhile the
                # user sees the same "Reconnecting..." as on WebSocket.
                if id not in self.sources_down:
                    self.sources_down.append(id)
                self._show_status()
            elif source.readyState == SOURCE_CLOSED:
                # Given up: the server refused the stream (404, 410), or the browser
                # stopped retrying. Ask the server which (EventSource never says).
                asyncio.create_task(self._check_stream(id))

        proxies = [create_proxy(on_event), create_proxy(on_error)]
        for name in ("token", "done", "error"):
            source.addEventListener(name, proxies[0])
        source.onerror = proxies[1]
        self._source_proxies[id] = proxies  # the proxies live as long as the source
        self.sources[id] = source

    def _source_up(self, id):
        if id in self.sources_down:
            self.sources_down.remove(id)
            self._show_status()

    async def _check_stream(self, id):
        """An EventSource gave up on stream `id`: reopen it if the server still serves it,
        end it with the server's error if not, or try again later if unreachable."""
        stream = self.session.get(id)
        if stream is None or stream.status != STREAMING:
            return
        status, body = await self._probe_stream(id, stream.last)
        if self.conn.transport != "sse" or stream.status != STREAMING:
            return
        if status == 200:
            self._open_source(id, stream.last)
        elif body is not None and body.get("retryable"):
            delay = body.get("retry_after") or RETRY_DELAY
            later(delay, lambda: asyncio.create_task(self._check_stream(id)))
        elif body is not None and body.get("code"):
            self.on_frame(
                {
                    "type": "error",
                    "id": id,
                    "code": body["code"],
                    "message": body.get("message", ""),
                    "retryable": body.get("retryable", False),
                }
            )
        else:
            later(RETRY_DELAY, lambda: asyncio.create_task(self._check_stream(id)))

    async def _probe_stream(self, id, after):
        """The status of `GET /api/streams/<id>` (and its error body), without reading the
        event stream itself: the request is aborted once the headers are in."""
        controller = window.AbortController.new()
        later(HTTP_TIMEOUT, lambda: controller.abort())
        try:
            response = await http(
                "/api/streams/" + id + "?after=" + str(after), signal=controller.signal
            )
            status = int(response.status)
            text = "" if status == 200 else str(await response.text())
        except Exception:
            return None, None
        controller.abort()
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, None

    def _close_source(self, id):
        source = self.sources.pop(id, None)
        self._source_proxies.pop(id, None)
        self._source_up(id)
        if source is not None:
            source.close()

    def _close_all_sources(self):
        for id in list(self.sources):
            self._close_source(id)

    # ---- HTTP ----------------------------------------------------------------------------

    async def _get_json(self, url, timeout=HTTP_TIMEOUT):
        """The JSON body of a successful GET, or None (offline, or an error status)."""
        status, body = await self._fetch_json(url, timeout)
        return body if status == 200 else None

    async def _fetch_json(self, url, timeout=HTTP_TIMEOUT):
        """(status, JSON body or None) of a GET; (None, None) if the network failed."""
        try:
            response = await http(url, timeout=timeout)
            text = str(await response.text())
        except Exception:  # a network failure rejects the promise: offline
            return None, None
        status = int(response.status)
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, None

    async def _post(self, url, payload):
        try:
            body = json.dumps(payload) if payload is not None else ""
            response = await http(url, method="POST", body=body)
            text = str(await response.text())
        except Exception:
            return None, None
        status = int(response.status)
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, None
