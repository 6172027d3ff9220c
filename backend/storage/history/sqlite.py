"""Conversation history in one SQLite file (the `History` contract, standard library only).

Deliberate choices a reader might want to "fix":

- Every sqlite call runs on one worker thread owned by the instance, with the one connection
  that thread created. sqlite3 blocks, so it must stay off the event loop, and a single thread
  serialises writes without locks (SQLite allows one writer at a time anyway).
- Messages are ordered by `turn`, not by a global rowid: a user message takes the next turn of
  its conversation and its answer shares that turn, sorting after it by role. An answer saved
  twice keeps its place, and answers that arrive out of order still sit under their question.
- Timestamps come from `time.time()` but never repeat or go backwards within one instance,
  so "most recently updated first" follows the order of the writes even on a coarse clock.
- A conversation's title is set by its first user message and then kept, except that a blank
  title (a whitespace-only first message, or a conversation first seen through an answer)
  is filled by the next user message: an empty entry in the list helps nobody.
- Writes use `BEGIN IMMEDIATE`: the write lock is taken up front, so another process sharing
  the file (WAL allows it) waits up to `DEFAULT_BUSY_TIMEOUT` instead of failing mid-transaction.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar

from backend.storage.history.base import (
    DEFAULT_LIST_LIMIT,
    ConversationSummary,
    History,
    StoredMessage,
)

T = TypeVar("T")

SCHEMA_VERSION: Final = 1
TITLE_MAX_CHARS: Final = 80
DEFAULT_BUSY_TIMEOUT: Final = 5.0  # seconds to wait for another process's write lock
MEMORY: Final = ":memory:"

# Each statement runs on its own: executescript() would commit behind our back.
_SCHEMA: Final = (
    """
    CREATE TABLE IF NOT EXISTS conversations (
        user TEXT NOT NULL,
        id TEXT NOT NULL,
        title TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY (user, id)
    ) WITHOUT ROWID
    """,
    """
    CREATE INDEX IF NOT EXISTS conversations_by_updated
        ON conversations (user, updated DESC)
    """,
    """
    CREATE TABLE IF NOT EXISTS messages (
        user TEXT NOT NULL,
        id TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        conversation TEXT NOT NULL,
        text TEXT NOT NULL,
        complete INTEGER NOT NULL,
        created REAL NOT NULL,
        turn INTEGER NOT NULL,
        PRIMARY KEY (user, id, role),
        FOREIGN KEY (user, conversation) REFERENCES conversations (user, id) ON DELETE CASCADE
    ) WITHOUT ROWID
    """,
    # role DESC matches the reading order (a user message before its answer), so that
    # messages() walks this index backwards with no sort step.
    """
    CREATE INDEX IF NOT EXISTS messages_by_turn
        ON messages (user, conversation, turn, role DESC)
    """,
)

_MESSAGE_COLUMNS: Final = "id, conversation, role, text, complete, created"


def conversation_title(text: str) -> str:
    """The title of a conversation started by `text`: whitespace collapsed, at most
    `TITLE_MAX_CHARS` characters, ending in "…" when cut."""
    title = " ".join(text.split())
    if len(title) <= TITLE_MAX_CHARS:
        return title
    return title[: TITLE_MAX_CHARS - 1].rstrip() + "…"


def _stored_message(row: tuple[Any, ...]) -> StoredMessage:
    id_, conversation, role, text, complete, created = row
    # The CHECK constraint allows only these two; spelled out so the Literal type holds.
    checked_role: Literal["user", "assistant"] = "user" if role == "user" else "assistant"
    return StoredMessage(
        id=str(id_),
        conversation=str(conversation),
        role=checked_role,
        text=str(text),
        complete=bool(complete),
        created=float(created),
    )


@contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # A failed COMMIT leaves the transaction open; the next BEGIN would fail.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _next_turn(conn: sqlite3.Connection, user: str, conversation: str) -> int:
    (last,) = conn.execute(
        "SELECT max(turn) FROM messages WHERE user = ? AND conversation = ?",
        (user, conversation),
    ).fetchone()
    return 1 if last is None else int(last) + 1


class SqliteHistory(History):
    """History in a SQLite file (or `":memory:"`), one worker thread, one connection.

    Use `await SqliteHistory.open(path)` (or `async with`) so that a bad path or schema
    fails at start-up; a bare `SqliteHistory(path)` connects on first use.
    """

    def __init__(self, path: str, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        if path != MEMORY:
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(directory):
                raise ValueError(f"TOKENWIRE_DB: directory {directory} does not exist")
        self._path = path
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenwire-history")
        self._connection: sqlite3.Connection | None = None  # only touched by the worker thread
        self._last_timestamp = 0.0  # only touched by the worker thread
        self._closed = False

    @classmethod
    async def open(cls, path: str, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> Self:
        """A ready instance: connected, schema created or checked."""
        history = cls(path, busy_timeout)
        try:
            await history._run(lambda conn: None)
        except BaseException:
            await history.aclose()
            raise
        return history

    async def __aenter__(self) -> Self:
        await self._run(lambda conn: None)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection and stop the worker thread; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        # The worker runs jobs in order, so this one runs after every job already queued.
        await loop.run_in_executor(self._executor, self._close_connection)
        # Nothing is queued behind the close and the thread exits on its own; waiting
        # for it would block the event loop for no benefit.
        self._executor.shutdown(wait=False)

    async def add_user_message(self, user: str, conversation: str, id: str, text: str) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            with _write_transaction(conn):
                exists = conn.execute(
                    "SELECT 1 FROM messages WHERE user = ? AND id = ? AND role = 'user'",
                    (user, id),
                ).fetchone()
                if exists is not None:
                    return False
                now = self._now()
                self._touch_conversation(conn, user, conversation, conversation_title(text), now)
                conn.execute(
                    "INSERT INTO messages"
                    " (user, id, role, conversation, text, complete, created, turn)"
                    " VALUES (?, ?, 'user', ?, ?, 1, ?, ?)",
                    (user, id, conversation, text, now, _next_turn(conn, user, conversation)),
                )
                return True

        return await self._run(job)

    async def get_user_message(self, user: str, id: str) -> StoredMessage | None:
        def job(conn: sqlite3.Connection) -> StoredMessage | None:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages"
                " WHERE user = ? AND id = ? AND role = 'user'",
                (user, id),
            ).fetchone()
            return None if row is None else _stored_message(row)

        return await self._run(job)

    async def save_assistant_message(
        self, user: str, conversation: str, id: str, text: str, complete: bool
    ) -> None:
        def job(conn: sqlite3.Connection) -> None:
            with _write_transaction(conn):
                now = self._now()
                # An answer normally follows its user message; if there is none, the
                # conversation still has to exist for the answer to be listed. Its title
                # stays empty until a user message gives it one.
                self._touch_conversation(conn, user, conversation, "", now)
                conn.execute(
                    "INSERT INTO messages"
                    " (user, id, role, conversation, text, complete, created, turn)"
                    " VALUES (?, ?, 'assistant', ?, ?, ?, ?, ?)"
                    " ON CONFLICT (user, id, role) DO UPDATE SET"
                    " conversation = excluded.conversation, text = excluded.text,"
                    " complete = excluded.complete, created = excluded.created,"
                    " turn = excluded.turn",
                    (
                        user,
                        id,
                        conversation,
                        text,
                        complete,
                        now,
                        self._answer_turn(conn, user, conversation, id),
                    ),
                )

        await self._run(job)

    async def list_conversations(
        self, user: str, limit: int = DEFAULT_LIST_LIMIT
    ) -> list[ConversationSummary]:
        if limit < 0:
            raise ValueError(f"limit must be >= 0 (got {limit})")

        def job(conn: sqlite3.Connection) -> list[ConversationSummary]:
            rows = conn.execute(
                "SELECT id, title, created, updated FROM conversations"
                " WHERE user = ? ORDER BY updated DESC LIMIT ?",
                (user, limit),
            ).fetchall()
            return [
                ConversationSummary(
                    conversation=str(id_),
                    title=str(title),
                    created=float(created),
                    updated=float(updated),
                )
                for id_, title, created, updated in rows
            ]

        return await self._run(job)

    async def conversation(self, user: str, conversation: str) -> ConversationSummary | None:
        def job(conn: sqlite3.Connection) -> ConversationSummary | None:
            row = conn.execute(
                "SELECT title, created, updated FROM conversations WHERE user = ? AND id = ?",
                (user, conversation),
            ).fetchone()
            if row is None:
                return None
            title, created, updated = row
            return ConversationSummary(
                conversation=conversation,
                title=str(title),
                created=float(created),
                updated=float(updated),
            )

        return await self._run(job)

    async def messages(
        self, user: str, conversation: str, limit: int = 1000
    ) -> list[StoredMessage] | None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0 (got {limit})")

        def job(conn: sqlite3.Connection) -> list[StoredMessage] | None:
            # One read transaction, so the existence check and the rows agree.
            conn.execute("BEGIN")
            try:
                exists = conn.execute(
                    "SELECT 1 FROM conversations WHERE user = ? AND id = ?",
                    (user, conversation),
                ).fetchone()
                if exists is None:
                    return None
                # Newest first to take the last `limit`; oldest first is (turn, 'user'
                # before 'assistant'), so its reverse is (turn DESC, role ASC).
                rows = conn.execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages"
                    " WHERE user = ? AND conversation = ?"
                    " ORDER BY turn DESC, role ASC LIMIT ?",
                    (user, conversation, limit),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
            return [_stored_message(row) for row in reversed(rows)]

        return await self._run(job)

    # --- worker-thread side -------------------------------------------------------------

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RuntimeError("SqliteHistory is closed")
        loop = asyncio.get_running_loop()
        # If the caller is cancelled the job still runs to the end on the worker, so a
        # write is either committed or rolled back, never left half done.
        return await loop.run_in_executor(self._executor, self._run_in_worker, job)

    def _run_in_worker(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._connection is None:
            self._connection = self._connect()
        return job(self._connection)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, the module never does.
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            if self._path != MEMORY:
                conn.execute("PRAGMA journal_mode = WAL")
            # With WAL, NORMAL loses at most the last commits on power loss, never corrupts.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._create_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        with _write_transaction(conn):
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise ValueError(
                    f"TOKENWIRE_DB: {self._path} has schema version {version}, newer than"
                    f" this tokenwire supports ({SCHEMA_VERSION}); upgrade tokenwire"
                )
            for statement in _SCHEMA:
                conn.execute(statement)
            # PRAGMA takes no parameters; SCHEMA_VERSION is our own integer constant.
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _now(self) -> float:
        # Strictly increasing: equal or stepped-back clock readings would break the
        # "most recently updated first" order of conversations.
        now = max(time.time(), self._last_timestamp + 1e-6)
        self._last_timestamp = now
        return now

    @staticmethod
    def _touch_conversation(
        conn: sqlite3.Connection, user: str, conversation: str, title: str, now: float
    ) -> None:
        """Create the conversation, or bump its `updated`; the title is set only once."""
        conn.execute(
            "INSERT INTO conversations (user, id, title, created, updated)"
            " VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (user, id) DO UPDATE SET updated = excluded.updated,"
            " title = CASE WHEN conversations.title = '' THEN excluded.title"
            " ELSE conversations.title END",
            (user, conversation, title, now, now),
        )

    @staticmethod
    def _answer_turn(conn: sqlite3.Connection, user: str, conversation: str, id: str) -> int:
        """The turn of the answer to request `id`: its question's, else the one it had."""
        rows = conn.execute(
            "SELECT role, turn FROM messages WHERE user = ? AND id = ? AND conversation = ?",
            (user, id, conversation),
        ).fetchall()
        turns = {str(role): int(turn) for role, turn in rows}
        if "user" in turns:
            return turns["user"]
        if "assistant" in turns:
            return turns["assistant"]
        return _next_turn(conn, user, conversation)
