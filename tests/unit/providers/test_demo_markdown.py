"""The browser's streaming markdown on the demo model's real answers, cut as they stream.

CPython only (the demo model lives in the backend); the MicroPython-compatible tests of the
same module are in tests/unit/frontend/test_core_markdown.py.
"""

import random

from backend.providers import demo_reply, demo_tokens
from frontend.tokenwire.core.markdown import (
    TAGS,
    MarkdownStream,
    coalesce,
    plain_text,
    render_ops_to_html,
)

PROMPTS = [
    f"prompt {i}: how do I {('stream', 'resume', 'retry')[i % 3]} tokens?" for i in range(50)
]


def ops_for_chunks(chunks: list[str]) -> list[tuple[str, ...]]:
    stream = MarkdownStream()
    ops: list[tuple[str, ...]] = []
    for chunk in chunks:
        ops.extend(stream.feed(chunk))
    ops.extend(stream.finish())
    return ops


def words(ops: list[tuple[str, ...]]) -> list[str]:
    """The words on the page; block elements separate words, inline ones do not."""
    parts: list[str] = []
    open_tags: list[str] = []
    for op in ops:
        if op[0] == "text":
            parts.append(op[1])
            continue
        tag = open_tags.pop() if op[0] == "close" else op[1]
        if op[0] == "open":
            open_tags.append(tag)
        if tag not in ("strong", "em", "code") or "pre" in open_tags:
            parts.append(" ")
    return "".join(parts).split()


def random_chunks(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, len(text) // 3)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_demo_answers_render_the_same_however_they_are_cut() -> None:
    rng = random.Random(20261125)
    for prompt in PROMPTS:
        text = demo_reply(prompt, paragraphs=4)
        whole = coalesce(ops_for_chunks([text]))
        assert coalesce(ops_for_chunks(demo_tokens(prompt, paragraphs=4))) == whole, prompt
        for _ in range(3):
            assert coalesce(ops_for_chunks(random_chunks(rng, text))) == whole, prompt
        assert coalesce(ops_for_chunks(list(text))) == whole, prompt


def test_demo_answers_show_lists_code_and_emphasis() -> None:
    for prompt in PROMPTS:
        text = demo_reply(prompt, paragraphs=4)
        ops = ops_for_chunks(demo_tokens(prompt, paragraphs=4))
        assert all(op[1] in TAGS for op in ops if op[0] == "open"), ops
        html = render_ops_to_html(ops)
        for fragment in ("<p>", "<ul><li>", '<pre><code class="language-python">', "<strong>"):
            assert fragment in html, (fragment, html)
        assert html.count("<pre>") == 1, html
        # Inline code spans, not literal backticks, outside the code block.
        assert "<code>" in html and "`" not in html, html
        # The fenced snippet reaches the page verbatim, without the fence lines.
        snippet = text.split("```python\n", 1)[1].split("\n```", 1)[0]
        assert snippet in plain_text(ops), prompt
        # Markers go, words stay.
        expected = text.replace("```python", "").replace("**", "").replace("`", "")
        expected_words = [word for word in expected.split() if word != "-"]
        assert words(ops) == expected_words, prompt
