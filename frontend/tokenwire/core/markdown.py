"""Streaming markdown: answer text in, append-only DOM operations out. Pure: no browser imports.

`MarkdownStream.feed(chunk)` returns operations that only ever *append* to what is on the
page, so a streamed answer never flickers or shifts while it grows:

- ``("open", tag)`` creates element `tag` inside the current element and makes it current;
  ``("open", "code", "python")`` carries the fenced block's language and
  ``("open", "ol", "3")`` a list's first number (only when it is not 1). The third item is
  already sanitised (letters, digits, ``_+-.#``; or digits) and may be ignored.
- ``("text", s)`` appends text `s` to the current element (a DOM text node, never HTML).
- ``("close",)`` makes the parent current again.

Every tag is one of `TAGS`. After `finish()` every "open" has been closed. Feeding a text in
any chunks gives the same operations as feeding it whole once adjacent "text" operations are
merged (`coalesce`), which is what the DOM applier does with consecutive text nodes.

Deliberate choices (a small, predictable subset of CommonMark; anything else is plain text):

- Lines of one paragraph, list item or quote are joined with a "\\n" text operation: the page
  shows them with CSS ``white-space: pre-wrap``, and `plain_text` keeps the line breaks.
- A line's kind is decided from its first few characters (`MAX_INDENT` spaces of indentation,
  then at most a marker such as ``12. `` or ``### ``); only those are held back, the rest of
  the line is emitted as it arrives. An opening fence line is held until its newline (or
  `MAX_FENCE_LINE` characters): it shows nothing and names the language.
- A line separator is emitted when the *next* line continues the block, so a code block
  never ends with a stray empty line and nothing emitted has to be taken back.
- Lists nest by indentation (2 or more spaces deeper than the parent item); ``-``, ``*`` and
  ``+`` bullets, ``1.`` or ``1)`` numbers. Only a paragraph-like text line continues an item.
- Inline: backtick code spans (a run of N backticks closes only with a run of N), ``**strong**``
  and ``*em*`` with CommonMark's flanking rule (``a * b`` stays literal); underscores are never
  emphasis, because model prose is full of snake_case names. An inline element still open at
  the end of its block is closed there. A trailing run of ``*`` or backticks is held until the
  next character shows its length.
- "\\r" is dropped: it only ever appears in "\\r\\n" line ends, and dropping single characters
  cannot depend on how the text was cut.
- `finish()` treats the end of the text as the end of a line.

Everything is linear in the text: the held-back pieces are bounded and each character is
looked at a constant number of times.

This module is the character machine: block structure (paragraphs, lists, quotes, headings,
code blocks) and inline markup. What kind a line is comes from `markdown_lines`; the
operations' helpers (`TAGS`, `coalesce`, `plain_text`, `render_ops_to_html`) live in
`markdown_ops` and are importable from here too.
"""

# Relative imports: this module is imported as `tokenwire.core.markdown` by the page and as
# `frontend.tokenwire.core.markdown` by CPython tests and the e2e page helper.
from .markdown_lines import (
    BLANK,
    CLOSE_FENCE,
    CODE_LINE,
    HEADING,
    ITEM,
    MAX_INDENT,
    OPEN_FENCE,
    QUOTE,
    UNDECIDED,
    classify,
    fence_language,
)
from .markdown_ops import TAGS, coalesce, plain_text, render_ops_to_html

# Imported from here by the page, the unit tests and the e2e page helper.
__all__ = (
    "MAX_INDENT",
    "TAGS",
    "MarkdownStream",
    "coalesce",
    "plain_text",
    "render_ops_to_html",
)

MAX_FENCE_LINE = 64  # characters of an opening fence line kept to find the language
NEST_INDENT = 2  # an item this much deeper than the current one starts a nested list

_INLINE_TAGS = ("strong", "em", "code")

# Modes of the character machine.
_HEAD = 0  # at the start of a line, holding its first characters until its kind is known
_INLINE = 1  # in the rest of a paragraph, list item, heading or quote line
_FENCE = 2  # in the rest of an opening fence line (the language)
_CODE = 3  # in the rest of a line inside a fenced code block


class MarkdownStream:
    """Turns an answer's text, fed in chunks of any size, into append-only DOM operations."""

    def __init__(self):
        self._mode = _HEAD
        self._head = ""  # held-back start of the current line (_HEAD mode)
        self._fence_info = ""  # start of an opening fence line (_FENCE mode)
        self._stack = []  # open tags, outermost first
        self._block = None  # None, "p", "list", "heading", "quote" or "code"
        self._lists = []  # [tag, indent] of each open list, outermost first
        self._quote_paragraph = False  # a "p" is open inside the current blockquote
        self._code_lines = 0  # lines of the open code block emitted so far
        self._code_ticks = 0  # backticks that opened the current inline code span
        self._run_char = ""  # "*" or "`" while a run of it is held back
        self._run_length = 0
        self._after_space = True  # the character before the current position is whitespace
        self._finished = False

    def feed(self, text: str) -> list:
        """Operations for the next chunk of the answer."""
        if self._finished:
            raise ValueError("MarkdownStream.feed() after finish()")
        ops = []
        self._feed(text, ops)
        return ops

    def finish(self) -> list:
        """Operations that end the answer: held-back characters, then a close for every open."""
        if self._finished:
            return []
        ops = []
        if self._mode != _HEAD or self._head:
            self._feed("\n", ops)
        self._close_all(ops)
        self._finished = True
        return ops

    # -- the character machine -----------------------------------------------------------

    def _feed(self, text: str, ops: list) -> None:
        if "\r" in text:
            text = text.replace("\r", "")
        i = 0
        n = len(text)
        while i < n:
            mode = self._mode
            if mode == _INLINE:
                i = self._feed_inline(text, i, ops)
            elif mode == _HEAD:
                i = self._feed_head(text, i, ops)
            elif mode == _CODE:
                end = text.find("\n", i)
                if end < 0:
                    self._text(text[i:], ops)
                    i = n
                else:
                    self._text(text[i:end], ops)
                    self._mode = _HEAD
                    i = end + 1
            else:  # _FENCE
                end = text.find("\n", i)
                stop = n if end < 0 else end
                room = MAX_FENCE_LINE - len(self._fence_info)
                if room > 0:
                    self._fence_info += text[i : min(stop, i + room)]
                if end < 0:
                    i = n
                else:
                    self._open_code_block(ops)
                    i = end + 1

    def _feed_head(self, text: str, i: int, ops: list) -> int:
        """Take characters into the held-back line start until the line's kind is known."""
        in_code = self._block == "code"
        n = len(text)
        while i < n:
            ch = text[i]
            end_of_line = ch == "\n"
            if not end_of_line:
                self._head += ch
            kind = classify(self._head, end_of_line, in_code)
            if kind is UNDECIDED:
                i += 1
                continue
            head = self._head
            self._head = ""
            self._start_line(kind, head, ops)
            if end_of_line and self._mode == _HEAD:
                return i + 1  # the line was complete in itself (blank, closing fence)
            # The newline itself is handled by the mode the line put us in.
            return i if end_of_line else i + 1
        return n

    def _start_line(self, kind: tuple, head: str, ops: list) -> None:
        what, start, extra = kind
        content = head[start:]
        if what == CODE_LINE:
            if self._code_lines:
                self._text("\n", ops)
            self._code_lines += 1
            self._text(content, ops)
            self._mode = _CODE
            return
        if what == CLOSE_FENCE:
            self._close_all(ops)
            return
        if what == BLANK:
            self._close_all(ops)
            return
        if what == OPEN_FENCE:
            self._close_all(ops)
            self._fence_info = content[:MAX_FENCE_LINE]
            self._mode = _FENCE
            return
        if what == HEADING:
            self._close_all(ops)
            self._open("h" + str(extra), ops)
            self._block = "heading"
        elif what == ITEM:
            self._start_item(extra, ops)
        elif what == QUOTE:
            if not self._start_quote_line(extra, ops):
                self._mode = _INLINE
                return
        elif self._block in ("p", "list") or (self._block == "quote" and self._quote_paragraph):
            self._text("\n", ops)  # the line continues the paragraph, item or quote
        else:
            self._close_all(ops)
            self._open("p", ops)
            self._block = "p"
        self._mode = _INLINE
        self._after_space = True
        if content:
            self._feed_inline(content, 0, ops)

    def _start_item(self, item: tuple, ops: list) -> None:
        tag, indent, number = item
        lists = self._lists
        if self._block == "list":
            self._close_inline(ops)
            while len(lists) > 1 and lists[-1][1] > indent:
                self._close(ops)  # li
                self._close(ops)  # ul / ol
                lists.pop()
            top = lists[-1]
            if indent >= top[1] + NEST_INDENT:
                self._open_list(tag, indent, number, ops)  # nested inside the open item
                return
            self._close(ops)  # li
            if top[0] == tag:
                self._open("li", ops)
                return
            self._close(ops)  # a different kind of list at the same level
            lists.pop()
            self._open_list(tag, top[1] if lists else indent, number, ops)
            return
        self._close_all(ops)
        self._block = "list"
        self._open_list(tag, indent, number, ops)

    def _open_list(self, tag: str, indent: int, number: int, ops: list) -> None:
        if tag == "ol" and number != 1:
            self._stack.append(tag)
            ops.append(("open", tag, str(number)))
        else:
            self._open(tag, ops)
        self._open("li", ops)
        self._lists.append([tag, indent])

    def _start_quote_line(self, empty: bool, ops: list) -> bool:
        """Enter a "> " line; False if it is an empty ">" line (which ends a quote paragraph)."""
        if self._block != "quote":
            self._close_all(ops)
            self._open("blockquote", ops)
            self._block = "quote"
        elif self._quote_paragraph and not empty:
            self._text("\n", ops)
            return True
        if empty:
            self._close_inline(ops)
            if self._quote_paragraph:
                self._close(ops)
                self._quote_paragraph = False
            return False
        self._open("p", ops)
        self._quote_paragraph = True
        return True

    def _open_code_block(self, ops: list) -> None:
        self._open("pre", ops)
        language = fence_language(self._fence_info)
        self._fence_info = ""
        self._stack.append("code")
        ops.append(("open", "code", language) if language else ("open", "code"))
        self._block = "code"
        self._code_lines = 0
        self._mode = _HEAD

    def _feed_inline(self, text: str, i: int, ops: list) -> int:
        """Emit the rest of a line, opening and closing inline elements at their markers."""
        n = len(text)
        start = i
        while i < n:
            ch = text[i]
            if self._run_char:
                if ch == self._run_char:
                    self._run_length += 1
                    i += 1
                    start = i
                    continue
                self._end_run(ch, ops)
            if ch == "\n":
                self._inline_text(text[start:i], ops)
                self._end_line(ops)
                return i + 1
            if ch == "`" or (ch == "*" and self._code_ticks == 0):
                self._inline_text(text[start:i], ops)
                self._run_char = ch
                self._run_length = 1
                i += 1
                start = i
                continue
            i += 1
        self._inline_text(text[start:n], ops)
        return n

    def _inline_text(self, s: str, ops: list) -> None:
        if s:
            ops.append(("text", s))
            self._after_space = s[-1] in " \t\n"

    def _end_run(self, next_char: str, ops: list) -> None:
        """Resolve a held-back run of "*" or backticks now that the next character is known."""
        ch = self._run_char
        k = self._run_length
        self._run_char = ""
        self._run_length = 0
        after_space = self._after_space
        self._after_space = False
        if ch == "`":
            if self._code_ticks == 0:
                self._code_ticks = k
                self._open("code", ops)
            elif self._code_ticks == k:
                self._code_ticks = 0
                self._close(ops)
            else:
                self._text(ch * k, ops)
            return
        stack = self._stack
        if not after_space:  # right-flanking: may close
            while k > 0:
                top = stack[-1]
                if top == "em" and (k != 2 or "strong" not in stack):
                    self._close(ops)
                    k -= 1
                elif k >= 2 and "strong" in stack:
                    while stack[-1] != "strong":
                        self._close(ops)
                    self._close(ops)
                    k -= 2
                else:
                    break
        if k and next_char not in " \t\n":  # left-flanking: may open
            if k >= 2 and "strong" not in stack:
                self._open("strong", ops)
                k -= 2
            if k and "em" not in stack:
                self._open("em", ops)
                k -= 1
        if k:
            self._text(ch * k, ops)

    def _end_line(self, ops: list) -> None:
        if self._block == "heading":
            self._close_all(ops)
        self._mode = _HEAD

    # -- the open elements ---------------------------------------------------------------

    def _text(self, s: str, ops: list) -> None:
        if s:
            ops.append(("text", s))

    def _open(self, tag: str, ops: list) -> None:
        self._stack.append(tag)
        ops.append(("open", tag))

    def _close(self, ops: list) -> None:
        tag = self._stack.pop()
        if tag == "code" and self._block != "code":
            self._code_ticks = 0
        ops.append(("close",))

    def _close_inline(self, ops: list) -> None:
        if self._block == "code":
            return
        while self._stack and self._stack[-1] in _INLINE_TAGS:
            self._close(ops)

    def _close_all(self, ops: list) -> None:
        while self._stack:
            self._close(ops)
        self._code_ticks = 0
        self._block = None
        self._lists = []
        self._quote_paragraph = False
