"""The kind of a markdown line, decided from its first characters. Pure: no browser imports.

`classify(head, end_of_line, in_code)` looks only at a line's start (at most `MAX_INDENT`
spaces, then a marker such as ``12. ``, ``### ``, ``> `` or a fence) and answers
`UNDECIDED` (None) while more characters could still change the answer, so that
`MarkdownStream` (tokenwire.core.markdown) holds back only those few characters and emits
the rest of the line as it arrives. Everything here is a function of its arguments.
"""

MAX_INDENT = 8  # more leading whitespace than this makes the line plain text, kept as is
MAX_OL_DIGITS = 9  # "1234567890." is not a list marker (as in CommonMark)
MAX_LANGUAGE = 20

_LANGUAGE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+-.#"
_SPACE = " \t"

# Line kinds, as decided by `classify`.
UNDECIDED = None
BLANK = "blank"
TEXT = "text"
ITEM = "item"
HEADING = "heading"
QUOTE = "quote"
OPEN_FENCE = "fence"
CLOSE_FENCE = "close-fence"
CODE_LINE = "code-line"


def _indent(head: str) -> int:
    i = 0
    while i < len(head) and head[i] in _SPACE:
        i += 1
    return i


def _run(s: str, start: int, ch: str) -> int:
    """Index just after the run of `ch` that begins at `start`."""
    i = start
    while i < len(s) and s[i] == ch:
        i += 1
    return i


def classify(head: str, end_of_line: bool, in_code: bool) -> tuple | None:
    """The kind of a line from its first characters, or None while it could still go either way.

    Returns (kind, content_start, extra): the line's own text starts at head[content_start:];
    `extra` is (list tag, indent, number) for items, the level for headings, and for quotes
    whether the line is an empty ">" line.
    """
    indent = _indent(head)
    if indent == len(head):  # only whitespace so far
        if end_of_line:
            return (CODE_LINE, 0, None) if in_code else (BLANK, 0, None)
        if indent > MAX_INDENT:
            return (CODE_LINE if in_code else TEXT, 0, None)
        return UNDECIDED
    if indent > MAX_INDENT:
        return (CODE_LINE if in_code else TEXT, 0, None)
    rest = head[indent:]
    if in_code:
        fence_end = _run(rest, 0, "`")
        if fence_end < 3:
            if fence_end == len(rest) and not end_of_line:
                return UNDECIDED
            return (CODE_LINE, 0, None)
        if fence_end == 3 and _indent(rest[3:]) == len(rest) - 3:
            if end_of_line:
                return (CLOSE_FENCE, 0, None)
            if len(head) <= MAX_INDENT + 3 + MAX_INDENT:
                return UNDECIDED
        return (CODE_LINE, 0, None)

    first = rest[0]
    if first in "-*+" or first.isdigit():
        if first.isdigit():
            marker_end = indent + _run_digits(rest)
            digits = marker_end - indent
            if digits > MAX_OL_DIGITS:
                return (TEXT, indent, None)
            if marker_end == len(head):
                return (TEXT, indent, None) if end_of_line else UNDECIDED
            if head[marker_end] not in ".)":
                return (TEXT, indent, None)
            marker_end += 1
            item = ("ol", indent, int(head[indent : marker_end - 1]))
        else:
            marker_end = indent + 1
            item = ("ul", indent, 1)
        if marker_end == len(head):
            return (TEXT, indent, None) if end_of_line else UNDECIDED
        if head[marker_end] in _SPACE:
            return (ITEM, marker_end + 1, item)
        return (TEXT, indent, None)
    if first == "#":
        level = _run(rest, 0, "#")
        if level == len(rest):
            if level <= 3 and not end_of_line:
                return UNDECIDED
            return (TEXT, indent, None)
        if level <= 3 and rest[level] in _SPACE:
            return (HEADING, indent + level + 1, level)
        return (TEXT, indent, None)
    if first == ">":
        if len(rest) == 1:
            return (QUOTE, len(head), True) if end_of_line else UNDECIDED
        skip = 1 if rest[1] in _SPACE else 0
        return (QUOTE, indent + 1 + skip, False)
    if first == "`":
        ticks = _run(rest, 0, "`")
        if ticks >= 3:
            return (OPEN_FENCE, indent + 3, None)
        if ticks == len(rest) and not end_of_line:
            return UNDECIDED
        return (TEXT, indent, None)
    return (TEXT, indent, None)


def _run_digits(s: str) -> int:
    i = 0
    while i < len(s) and s[i].isdigit():
        i += 1
    return i


def fence_language(info: str) -> str | None:
    """The language named by an opening fence line's info string, if it is a safe name
    (letters, digits, ``_+-.#``; at most `MAX_LANGUAGE` characters), else None."""
    words = info.split()
    if not words:
        return None
    word = words[0]
    if len(word) > MAX_LANGUAGE:
        return None
    for ch in word:
        if ch not in _LANGUAGE_CHARS:
            return None
    return word
