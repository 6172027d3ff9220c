"""Streaming markdown: expected HTML, split invariance, safety, hold-back bounds, linear time.

Runs unchanged under CPython (pytest) and MicroPython (tests/unit/frontend/run_micropython.mjs):
plain test functions, tables looped over inside the test, and only `random.seed`,
`random.randint` and `time.time`, which both interpreters have.
"""

import random
import time

from tokenwire.core.markdown import (
    MAX_INDENT,
    TAGS,
    MarkdownStream,
    coalesce,
    plain_text,
    render_ops_to_html,
)

# (markdown, the HTML its operations build)
CASES = (
    ("", ""),
    ("Hello", "<p>Hello</p>"),
    ("Hello **world**", "<p>Hello <strong>world</strong></p>"),
    ("one\ntwo\n\nthree", "<p>one\ntwo</p><p>three</p>"),
    ("one\n\n\n\ntwo\n\n", "<p>one</p><p>two</p>"),
    ("  indented\n   continued", "<p>indented\ncontinued</p>"),
    ("- a\n- b\n\nafter", "<ul><li>a</li><li>b</li></ul><p>after</p>"),
    ("* a\n+ b", "<ul><li>a</li><li>b</li></ul>"),
    ("Lead:\n- a\n- b", "<p>Lead:</p><ul><li>a</li><li>b</li></ul>"),
    ("- a\ncontinued", "<ul><li>a\ncontinued</li></ul>"),
    ("1. x\n2. y", "<ol><li>x</li><li>y</li></ol>"),
    ("3) x\n4) y", '<ol start="3"><li>x</li><li>y</li></ol>'),
    ("- a\n1. b", "<ul><li>a</li></ul><ol><li>b</li></ol>"),
    (
        "- a\n  - b\n    - c\n- d",
        "<ul><li>a<ul><li>b<ul><li>c</li></ul></li></ul></li><li>d</li></ul>",
    ),
    ("1. a\n   - b\n2. c", "<ol><li>a<ul><li>b</li></ul></li><li>c</li></ol>"),
    ("# One\n## Two\n### Three\ntext", "<h1>One</h1><h2>Two</h2><h3>Three</h3><p>text</p>"),
    ("#### Four", "<p>#### Four</p>"),
    ("#tag and # sign", "<p>#tag and # sign</p>"),
    ("# Title *em*", "<h1>Title <em>em</em></h1>"),
    ("para\n# Head", "<p>para</p><h1>Head</h1>"),
    ("> q\n> r", "<blockquote><p>q\nr</p></blockquote>"),
    ("> q\n>\n> r\nlazy", "<blockquote><p>q</p><p>r\nlazy</p></blockquote>"),
    (">no space", "<blockquote><p>no space</p></blockquote>"),
    ("> q\n\nafter", "<blockquote><p>q</p></blockquote><p>after</p>"),
    (
        "```python\nx = 1\n\n  y = '<b>'\n```\nafter",
        "<pre><code class=\"language-python\">x = 1\n\n  y = '&lt;b&gt;'</code></pre><p>after</p>",
    ),
    ("```\n**not bold** `x`\n```", "<pre><code>**not bold** `x`</code></pre>"),
    ("```\n````\n ``\n```", "<pre><code>````\n ``</code></pre>"),
    ("```\nunclosed", "<pre><code>unclosed</code></pre>"),
    ("```js title=x\ny\n```", '<pre><code class="language-js">y</code></pre>'),
    ('```"><script>\ny\n```', "<pre><code>y</code></pre>"),
    ("text\n```\ncode\n```\ntext", "<p>text</p><pre><code>code</code></pre><p>text</p>"),
    ("- item\n```\ncode\n```", "<ul><li>item</li></ul><pre><code>code</code></pre>"),
    ("```\ncode\n```   \nnext", "<pre><code>code</code></pre><p>next</p>"),
    ("a `co*de` b", "<p>a <code>co*de</code> b</p>"),
    ("x ``a`b`` y", "<p>x <code>a`b</code> y</p>"),
    ("`unclosed code", "<p><code>unclosed code</code></p>"),
    ("a * b * c", "<p>a * b * c</p>"),
    ("2*3*4", "<p>2<em>3</em>4</p>"),
    ("word* and *word", "<p>word* and <em>word</em></p>"),
    ("*em* and **strong**", "<p><em>em</em> and <strong>strong</strong></p>"),
    ("***both***", "<p><strong><em>both</em></strong></p>"),
    ("**a *b**", "<p><strong>a <em>b</em></strong></p>"),
    ("**bold\nacross lines**", "<p><strong>bold\nacross lines</strong></p>"),
    ("**unclosed\n\nnext", "<p><strong>unclosed</strong></p><p>next</p>"),
    ("- **unclosed\n- next", "<ul><li><strong>unclosed</strong></li><li>next</li></ul>"),
    ("snake_case_name and _x_", "<p>snake_case_name and _x_</p>"),
    ("---\n***", "<p>---\n***</p>"),
    ("-not a list\n1.5 not a list", "<p>-not a list\n1.5 not a list</p>"),
    ("1234567890. too long", "<p>1234567890. too long</p>"),
    ('Tom & Jerry "quoted" <b>', "<p>Tom &amp; Jerry &quot;quoted&quot; &lt;b&gt;</p>"),
    ("crlf\r\nline", "<p>crlf\nline</p>"),
)

# Texts with every kind of block and inline element, for the split-invariance property.
SAMPLES = (
    "Hello **world**, this is `code` and *emphasis*.\n\n"
    "A list:\n- first **item**\n- second `item`\n  - nested *one*\n- third\n\n"
    "1. one\n2. two\n10. ten\n\n"
    "# Heading\n## Sub *heading*\n\n"
    "> quoted **text**\n> more\n>\n> again\n\n"
    "```python\ndef f(x):\n    return x * 2  # **not bold**\n```\n"
    "After the code, ``double `tick` span`` and ***both***.\n",
    "**unclosed bold\n\n*unclosed em\n\n`unclosed code\n\n```\nunclosed fence",
    "a * b ** c *** d **** e\n* list\n** not list\n*** also not\n",
    "  - indented\n\t- tab\n        - eight\n         - nine spaces\n",
    "```\n```\n```\n\n```\n\n```\n`\n``\n```x\n````\n",
    "#\n##\n###\n####\n# \n>\n> \n-\n- \n1.\n1. \n",
)


def ops_for(text):
    stream = MarkdownStream()
    return stream.feed(text) + stream.finish()


def ops_for_chunks(chunks):
    stream = MarkdownStream()
    ops = []
    for chunk in chunks:
        ops.extend(stream.feed(chunk))
    ops.extend(stream.finish())
    return ops


def random_chunks(text, max_size):
    chunks = []
    i = 0
    while i < len(text):
        size = random.randint(1, max_size)
        chunks.append(text[i : i + size])
        i += size
    return chunks


def check_well_formed(ops):
    """Every op is known, every tag allowed, text non-empty, and every open is closed."""
    depth = 0
    for op in ops:
        if op[0] == "open":
            assert op[1] in TAGS, op
            assert len(op) == 2 or (len(op) == 3 and op[1] in ("code", "ol")), op
            depth += 1
        elif op[0] == "close":
            assert len(op) == 1, op
            depth -= 1
            assert depth >= 0, ops
        else:
            assert op[0] == "text" and len(op) == 2, op
            assert isinstance(op[1], str) and op[1], op
    assert depth == 0, ops


def test_expected_html():
    for text, expected in CASES:
        html = render_ops_to_html(ops_for(text))
        assert html == expected, (text, html, expected)


def test_expected_html_when_fed_one_character_at_a_time():
    for text, expected in CASES:
        html = render_ops_to_html(ops_for_chunks(list(text)))
        assert html == expected, (text, html, expected)


def test_any_split_gives_the_same_operations():
    random.seed(1)
    for text in SAMPLES:
        whole = coalesce(ops_for(text))
        check_well_formed(whole)
        assert coalesce(ops_for_chunks(list(text))) == whole, text
        for _ in range(40):
            chunks = random_chunks(text, random.randint(1, 12))
            assert coalesce(ops_for_chunks(chunks)) == whole, chunks


def test_random_markdown_any_split_gives_the_same_operations():
    # Fuzz: short texts made of markdown's special characters, cut at random places.
    alphabet = "**`` -#>1.\n\n\na b_\t+)"
    random.seed(2)
    for _ in range(300):
        length = random.randint(0, 40)
        text = "".join([alphabet[random.randint(0, len(alphabet) - 1)] for _ in range(length)])
        whole = coalesce(ops_for(text))
        check_well_formed(whole)
        for _ in range(4):
            chunks = random_chunks(text, random.randint(1, 6))
            assert coalesce(ops_for_chunks(chunks)) == whole, chunks


def test_plain_text_is_the_input_without_markers():
    cases = (
        ("Hello **bold** and *em* and `code`", "Hello bold and em and code"),
        ("line one\nline two", "line one\nline two"),
        ("- a\n- b", "ab"),
        ("1. first\n2. second", "firstsecond"),
        ("# Title\ntext", "Titletext"),
        ("> quoted\n> more", "quoted\nmore"),
        ("```python\nx = 1\ny = 2\n```", "x = 1\ny = 2"),
        ("a * b and 2 ** 3", "a * b and 2 ** 3"),
        ("<script>alert(1)</script>", "<script>alert(1)</script>"),
    )
    for text, expected in cases:
        assert plain_text(ops_for(text)) == expected, (text, plain_text(ops_for(text)))


def test_model_html_is_only_ever_text():
    # (model text, the text the page shows for it)
    attacks = (
        ("<script>alert(1)</script>", "<script>alert(1)</script>"),
        ('<img src=x onerror="alert(1)">', '<img src=x onerror="alert(1)">'),
        ("**<img src=x onerror=alert(1)>**", "<img src=x onerror=alert(1)>"),
        ("- <iframe src=javascript:alert(1)>", "<iframe src=javascript:alert(1)>"),
        ("```html\n<script>alert(1)</script>\n```", "<script>alert(1)</script>"),
        # Not a language name: the fence line shows nothing and names no language.
        ('```"><img src=x onerror=alert(1)>\nx\n```', "x"),
        ("`<b>` &amp; &lt;", "<b> &amp; &lt;"),
    )
    for text, shown in attacks:
        ops = ops_for(text)
        check_well_formed(ops)
        for op in ops:
            if op[0] == "open" and len(op) == 3:
                for ch in op[2]:
                    assert ch.isalpha() or ch.isdigit() or ch in "_+-.#", op
        assert plain_text(ops) == shown, (text, ops)
        html = render_ops_to_html(ops)
        for dangerous in ("<script", "<img", "<iframe", "<b>"):
            assert dangerous not in html, html


def test_words_appear_as_they_are_fed():
    # (text, characters of the line start that may be held back before its content shows)
    cases = (
        ("plain words streaming in one by one", 0),
        ("- a list item with some words", 2),
        ("123. a numbered item with words", 5),
        ("### a heading with words", 4),
        ("> a quote with words", 2),
        ("        eight spaces then words", MAX_INDENT),
    )
    for text, marker in cases:
        stream = MarkdownStream()
        shown = ""
        for i in range(len(text)):
            shown += plain_text(stream.feed(text[i]))
            fed = i + 1
            if fed > marker:
                assert shown == text[marker:fed], (text, fed, shown)
    # Inside a code block a line is held back only while it could still be the closing fence.
    stream = MarkdownStream()
    stream.feed("```\n")
    shown = ""
    for ch in "x = `a` ** 2":
        shown += plain_text(stream.feed(ch))
    assert shown == "x = `a` ** 2", shown


def test_marker_split_across_chunks():
    cases = (
        (["Some *", "*bold** text"], "<p>Some <strong>bold</strong> text</p>"),
        (["a `", "code", "` b"], "<p>a <code>code</code> b</p>"),
        (["``", "`py", "thon\nx\n`", "``"], '<pre><code class="language-python">x</code></pre>'),
        (["Hel", "lo **wo", "rld**\n\n- it", "em\n```py", "thon\nx = 1\n```"], None),
    )
    for chunks, expected in cases:
        ops = ops_for_chunks(chunks)
        assert coalesce(ops) == coalesce(ops_for("".join(chunks))), chunks
        if expected is not None:
            assert render_ops_to_html(ops) == expected, (chunks, render_ops_to_html(ops))
    html = render_ops_to_html(ops_for_chunks(cases[3][0]))
    assert html == (
        "<p>Hello <strong>world</strong></p><ul><li>item</li></ul>"
        '<pre><code class="language-python">x = 1</code></pre>'
    ), html


def test_finish_closes_everything_and_ends_the_stream():
    stream = MarkdownStream()
    ops = stream.feed("> - **a `b")
    ops.extend(stream.finish())
    check_well_formed(ops)
    assert stream.finish() == []
    try:
        stream.feed("more")
    except ValueError:
        pass
    else:
        raise AssertionError("feed() after finish() must raise")


def test_time_is_linear_in_the_answer():
    unit = (
        "Some **bold** words and `code`, then *more*.\n- item one\n- item two\n\n"
        "```python\nx = 1\n```\n"
    )

    def seconds(size):
        text = unit * (size // len(unit))
        stream = MarkdownStream()
        started = time.time()
        for ch in text:  # one character per chunk: the worst case for per-call overhead
            stream.feed(ch)
        stream.finish()
        return time.time() - started

    small = seconds(25_000)
    large = seconds(100_000)
    # Linear work takes 4x as long; quadratic would take 16x. Generous for noisy machines.
    assert large < 10 * max(small, 0.01), (small, large)
    assert large < 30, large
