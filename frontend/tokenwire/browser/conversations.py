"""The conversation list (the sidebar: #conversations and #new-chat) and which conversation
is shown: the current one is kept in localStorage, so a reload shows it again.

Promises:
- switching clears what is shown at once, then loads the conversation's history
  (`GET /api/conversations/<conversation>`, docs/PROTOCOL.md) and hands it to `render`;
  when the user moved on while it loaded, nothing is rendered;
- a new conversation's history is never asked for (it has none); while the list could not
  be loaded, whether one is new cannot be known, so it is asked for anyway. What could not
  be loaded is marked stale (`list_stale`, `shown_stale`) and loaded once connected
  (`reload`); what is shown is rendered again only once its history is in hand, so a
  failure never wipes it.

The rendering itself (history, streams to resume, queued messages) is the owner's `render`
callback; `clear` forgets what is shown; `resume` carries on with what is shown when it
still cannot be reloaded.
"""

import asyncio

from pyscript import document

from tokenwire.browser.view import element
from tokenwire.browser.web import fetch_json, get_json, listen, new_id, storage_get, storage_set

CURRENT_KEY = "tokenwire.conversation"


class ConversationList:
    def __init__(self, clear, render, resume):
        self.clear = clear  # () -> None: forget what is shown
        self.render = render  # (conversation, history body or None) -> None
        self.resume = resume  # () -> None: resume the streams shown and send the queue
        self.nav = document.getElementById("conversations")
        self.new_chat_button = document.getElementById("new-chat")
        self.current = storage_get(CURRENT_KEY) or new_id()
        self.known = []  # conversations the server has
        self.list_stale = False  # the list could not be loaded (offline)
        self.shown_stale = False  # nor could the shown conversation: load both once connected

    def watch(self):
        """Take the user's "New chat"."""
        listen(self.new_chat_button, "click", lambda _e: self.new_chat())

    async def refresh(self):
        """Load the list again; offline, keep what is shown and mark it stale."""
        body = await get_json("/api/conversations")
        self.list_stale = body is None  # offline: load again once connected
        if body is None:
            return
        self.nav.replaceChildren()
        listed = False
        self.known = [c["conversation"] for c in body.get("conversations", [])]
        for c in body.get("conversations", []):
            self._link(c["conversation"], c["title"] or "New chat")
            listed = listed or c["conversation"] == self.current
        if not listed:
            link = self._link(self.current, "New chat")
            self.nav.prepend(link)

    def _link(self, conversation, title):
        link = element("a", "current" if conversation == self.current else None, title)
        link.href = "#" + conversation
        link.setAttribute("data-conversation", conversation)

        def open_it(event):
            event.preventDefault()
            asyncio.create_task(self.switch(conversation))

        listen(link, "click", open_it)
        self.nav.appendChild(link)
        return link

    def new_chat(self):
        asyncio.create_task(self.switch(new_id()))

    async def switch(self, conversation):
        if conversation == self.current:
            return
        await self.show(conversation)
        await self.refresh()

    async def show(self, conversation):
        """Show a conversation: cleared at once, then rendered from its history (when the
        history cannot be loaded, from the queue alone, and again once connected)."""
        self.current = conversation
        storage_set(CURRENT_KEY, conversation)
        self.clear()
        status, body = None, None
        # A new conversation has no history to load; offline, we cannot know it is new.
        if conversation in self.known or self.list_stale:
            status, body = await fetch_json("/api/conversations/" + conversation)
        if self.current != conversation:
            return  # the user moved on while we loaded
        self.shown_stale = status is None and (conversation in self.known or self.list_stale)
        self.render(conversation, body if status == 200 else None)

    async def reload(self):
        """Connected again after loading offline: load what could not be loaded. The shown
        conversation is rendered again only once its history is in hand, so a failure
        never wipes what is shown."""
        if self.list_stale:
            await self.refresh()
        conversation = self.current
        status, body = await fetch_json("/api/conversations/" + conversation)
        if self.current != conversation:
            return
        if status is None:
            self.resume()  # still unreachable: carry on with what is shown
            return
        self.shown_stale = False
        self.render(conversation, body if status == 200 else None)
