"""Chats: accepting a `chat`, running its generation, replay, resume and cancel."""
