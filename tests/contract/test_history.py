"""The `History` contract, run against every backend (add one to `BACKENDS` to cover it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from backend.storage.history import ConversationSummary, History, SqliteHistory, StoredMessage
from backend.storage.history.redis import RedisHistory

# Every await here is local I/O; a hang anywhere fails the test in seconds, with pytest-timeout
# printing the stack of the await that hung, rather than after the suite-wide 180 s.
pytestmark = pytest.mark.timeout(30)

BACKENDS = ["sqlite", "redis"]

OpenHistory = Callable[[], Awaitable[History]]
Seen = tuple[str, str, str, str, bool]  # (id, conversation, role, text, complete)


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
async def open_history(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[OpenHistory]:
    """Opens a backend on the same storage each time it is called, so a test can close one
    and reopen; closes whatever is still open at the end."""
    opened: list[History] = []
    # The storage of the Redis backend is the session's redis-server, emptied for each test.
    redis_url = request.getfixturevalue("redis_clean") if request.param == "redis" else ""

    async def open_() -> History:
        history: History
        if request.param == "sqlite":
            history = await SqliteHistory.open(str(tmp_path / "history.db"))
        elif request.param == "redis":
            history = RedisHistory(redis_url)
        else:
            raise NotImplementedError(request.param)
        opened.append(history)
        return history

    yield open_
    for history in opened:
        await history.aclose()  # aclose is idempotent, closing twice is part of the contract


@pytest.fixture
async def history(open_history: OpenHistory) -> History:
    return await open_history()


def seen(messages: list[StoredMessage] | None) -> list[Seen]:
    """What a reader of the conversation sees, without the timestamps."""
    assert messages is not None
    return [(m.id, m.conversation, m.role, m.text, m.complete) for m in messages]


def ids(conversations: list[ConversationSummary]) -> list[str]:
    return [c.conversation for c in conversations]


async def test_user_message_round_trip(history: History) -> None:
    assert await history.add_user_message("alice", "c1", "r1", "Hello there") is True

    stored = await history.get_user_message("alice", "r1")
    assert stored is not None
    assert (stored.id, stored.conversation, stored.role, stored.text, stored.complete) == (
        "r1",
        "c1",
        "user",
        "Hello there",
        True,
    )
    assert await history.messages("alice", "c1") == [stored]
    [summary] = await history.list_conversations("alice")
    assert (summary.conversation, summary.title) == ("c1", "Hello there")
    assert summary.created == summary.updated == stored.created


async def test_adding_the_same_request_again_changes_nothing(history: History) -> None:
    assert await history.add_user_message("alice", "c1", "r1", "first") is True
    before = await history.list_conversations("alice")

    assert await history.add_user_message("alice", "c1", "r1", "second") is False
    # Same request id aimed at another conversation: still the same key, still refused.
    assert await history.add_user_message("alice", "c2", "r1", "third") is False

    stored = await history.get_user_message("alice", "r1")
    assert stored is not None and stored.text == "first"
    assert seen(await history.messages("alice", "c1")) == [("r1", "c1", "user", "first", True)]
    assert await history.messages("alice", "c2") is None
    assert await history.list_conversations("alice") == before


async def test_users_never_see_each_other(history: History) -> None:
    assert await history.add_user_message("alice", "c1", "r1", "alice asks") is True
    await history.save_assistant_message("alice", "c1", "r1", "alice's answer", True)

    assert await history.list_conversations("bob") == []
    assert await history.messages("bob", "c1") is None
    assert await history.get_user_message("bob", "r1") is None

    # The same conversation and request ids under another user are a separate key.
    assert await history.add_user_message("bob", "c1", "r1", "bob asks") is True
    assert seen(await history.messages("bob", "c1")) == [("r1", "c1", "user", "bob asks", True)]
    assert seen(await history.messages("alice", "c1")) == [
        ("r1", "c1", "user", "alice asks", True),
        ("r1", "c1", "assistant", "alice's answer", True),
    ]
    [bob_summary] = await history.list_conversations("bob")
    assert bob_summary.title == "bob asks"


async def test_conversations_listed_most_recently_updated_first(history: History) -> None:
    for conversation in ["c1", "c2", "c3"]:
        assert await history.add_user_message("alice", conversation, f"{conversation}-r1", "hi")
    assert ids(await history.list_conversations("alice")) == ["c3", "c2", "c1"]

    assert await history.add_user_message("alice", "c1", "c1-r2", "again")
    assert ids(await history.list_conversations("alice")) == ["c1", "c3", "c2"]

    # An answer counts as an update too.
    await history.save_assistant_message("alice", "c2", "c2-r1", "answer", True)
    listed = await history.list_conversations("alice")
    assert ids(listed) == ["c2", "c1", "c3"]
    assert [c.updated for c in listed] == sorted((c.updated for c in listed), reverse=True)

    assert ids(await history.list_conversations("alice", limit=2)) == ["c2", "c1"]
    assert await history.list_conversations("alice", limit=0) == []


@pytest.mark.parametrize(
    ("text", "title"),
    [
        ("Hello", "Hello"),
        ("  What is\n\tthe   time?  ", "What is the time?"),
        ("a" * 80, "a" * 80),
        ("a" * 81, "a" * 79 + "…"),
        ("x" * 78 + " tail words", "x" * 78 + "…"),  # no space left before the "…"
        ("家" * 100, "家" * 79 + "…"),
    ],
    ids=[
        "short",
        "whitespace-collapsed",
        "exactly-80",
        "81-cut",
        "cut-at-space",
        "cjk-cut",
    ],
)
async def test_title_is_the_first_user_message(history: History, text: str, title: str) -> None:
    assert await history.add_user_message("alice", "c1", "r1", text)
    assert await history.add_user_message("alice", "c1", "r2", "a later message, not the title")

    [summary] = await history.list_conversations("alice")
    assert summary.title == title
    assert len(summary.title) <= 80


async def test_blank_first_message_leaves_the_title_to_the_next(history: History) -> None:
    assert await history.add_user_message("alice", "c1", "r1", " \n ")
    [summary] = await history.list_conversations("alice")
    assert summary.title == ""

    assert await history.add_user_message("alice", "c1", "r2", "now with words")
    assert await history.add_user_message("alice", "c1", "r3", "not the title")
    [summary] = await history.list_conversations("alice")
    assert summary.title == "now with words"


async def test_answer_saved_after_its_question_and_replaced(history: History) -> None:
    assert await history.add_user_message("alice", "c1", "r1", "question")

    await history.save_assistant_message("alice", "c1", "r1", "partial ans", False)
    assert seen(await history.messages("alice", "c1")) == [
        ("r1", "c1", "user", "question", True),
        ("r1", "c1", "assistant", "partial ans", False),
    ]

    await history.save_assistant_message("alice", "c1", "r1", "the full answer", True)
    assert seen(await history.messages("alice", "c1")) == [
        ("r1", "c1", "user", "question", True),
        ("r1", "c1", "assistant", "the full answer", True),
    ]


async def test_answers_sit_under_their_questions_whatever_the_save_order(history: History) -> None:
    assert await history.add_user_message("alice", "c1", "r1", "q1")
    assert await history.add_user_message("alice", "c1", "r2", "q2")
    await history.save_assistant_message("alice", "c1", "r2", "a2", True)
    await history.save_assistant_message("alice", "c1", "r1", "a1 cut", False)
    await history.save_assistant_message("alice", "c1", "r1", "a1", True)  # keeps its place

    assert seen(await history.messages("alice", "c1")) == [
        ("r1", "c1", "user", "q1", True),
        ("r1", "c1", "assistant", "a1", True),
        ("r2", "c1", "user", "q2", True),
        ("r2", "c1", "assistant", "a2", True),
    ]


async def test_messages_limit_keeps_the_last_ones_oldest_first(history: History) -> None:
    for n in range(5):
        assert await history.add_user_message("alice", "c1", f"r{n}", f"q{n}")
        await history.save_assistant_message("alice", "c1", f"r{n}", f"a{n}", True)

    assert seen(await history.messages("alice", "c1", limit=3)) == [
        ("r3", "c1", "assistant", "a3", True),
        ("r4", "c1", "user", "q4", True),
        ("r4", "c1", "assistant", "a4", True),
    ]
    assert len(seen(await history.messages("alice", "c1"))) == 10
    assert await history.messages("alice", "c1", limit=0) == []


async def test_unknown_things_are_none(history: History) -> None:
    assert await history.messages("alice", "nope") is None
    assert await history.get_user_message("alice", "nope") is None
    assert await history.list_conversations("alice") == []


async def test_history_survives_close_and_reopen(open_history: OpenHistory) -> None:
    first = await open_history()
    assert await first.add_user_message("alice", "c1", "r1", "remember me")
    await first.save_assistant_message("alice", "c1", "r1", "I will", True)
    before_messages = await first.messages("alice", "c1")
    before_list = await first.list_conversations("alice")
    await first.aclose()
    await first.aclose()  # idempotent

    second = await open_history()
    assert await second.messages("alice", "c1") == before_messages
    assert await second.list_conversations("alice") == before_list
    assert await second.add_user_message("alice", "c1", "r1", "again") is False


async def test_unicode_round_trips(history: History) -> None:
    text = "👩‍👩‍👧 家族 中文 日本語 한국어 עברית e\u0301 \U0001f600\n\t“quotes” — ok"
    assert await history.add_user_message("alice", "c-ü-家", "r-😀", text)
    await history.save_assistant_message("alice", "c-ü-家", "r-😀", text[::-1], True)

    assert seen(await history.messages("alice", "c-ü-家")) == [
        ("r-😀", "c-ü-家", "user", text, True),
        ("r-😀", "c-ü-家", "assistant", text[::-1], True),
    ]
    stored = await history.get_user_message("alice", "r-😀")
    assert stored is not None and stored.text == text


async def test_concurrent_adds_all_land(history: History) -> None:
    results = await asyncio.gather(
        *(history.add_user_message("alice", f"c{n % 7}", f"r{n}", f"m{n}") for n in range(200))
    )
    assert results == [True] * 200

    landed: set[str] = set()
    for conversation in ids(await history.list_conversations("alice")):
        messages = await history.messages("alice", conversation)
        assert messages is not None
        landed.update(m.id for m in messages)
    assert landed == {f"r{n}" for n in range(200)}


async def test_concurrent_duplicate_adds_store_one(history: History) -> None:
    results = await asyncio.gather(
        *(history.add_user_message("alice", "c1", "r1", f"m{n}") for n in range(200))
    )
    assert results.count(True) == 1
    assert len(seen(await history.messages("alice", "c1"))) == 1


def test_sqlite_in_a_missing_directory_names_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=r"TOKENWIRE_DB: directory .*missing does not exist"):
        SqliteHistory(str(missing / "history.db"))


async def test_sqlite_open_in_a_missing_directory_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TOKENWIRE_DB"):
        await SqliteHistory.open(str(tmp_path / "missing" / "history.db"))


async def test_sqlite_in_memory() -> None:
    async with SqliteHistory(":memory:") as history:
        assert await history.add_user_message("alice", "c1", "r1", "hi")
        assert seen(await history.messages("alice", "c1")) == [("r1", "c1", "user", "hi", True)]


async def test_conversation_summary(history: History) -> None:
    assert await history.conversation("u1", "c1") is None
    await history.add_user_message("u1", "c1", "m1", "first   words")
    summary = await history.conversation("u1", "c1")
    assert summary is not None
    assert (summary.conversation, summary.title) == ("c1", "first words")
    assert await history.conversation("u2", "c1") is None


def test_redis_url_is_checked() -> None:
    with pytest.raises(ValueError, match=r"TOKENWIRE_REDIS_URL must start with redis://"):
        RedisHistory("127.0.0.1:6379")
