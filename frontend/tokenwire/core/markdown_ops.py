"""The operations `MarkdownStream` (tokenwire.core.markdown) emits, and what is built from
them outside the page. Pure: no browser imports.

An operation is ``("open", tag)`` or ``("open", tag, attribute)``, ``("text", s)`` or
``("close",)``; every tag is one of `TAGS`. `coalesce` merges adjacent texts as the DOM does,
`plain_text` is the text a user sees, and `render_ops_to_html` is for tests and debugging
only: the page never parses HTML.
"""

TAGS = ("p", "ul", "ol", "li", "pre", "code", "strong", "em", "h1", "h2", "h3", "blockquote")


def coalesce(ops: list) -> list:
    """`ops` with adjacent "text" operations merged, as they end up in the DOM."""
    merged = []
    for op in ops:
        if op[0] == "text" and merged and merged[-1][0] == "text":
            merged[-1] = ("text", merged[-1][1] + op[1])
        else:
            merged.append(op)
    return merged


def plain_text(ops: list) -> str:
    """The text the operations put on the page, markup left out."""
    return "".join([op[1] for op in ops if op[0] == "text"])


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def render_ops_to_html(ops: list) -> str:
    """The HTML the operations build (for tests and debugging; the page never parses HTML)."""
    parts = []
    stack = []
    for op in ops:
        if op[0] == "text":
            parts.append(_escape(op[1]))
        elif op[0] == "open":
            tag = op[1]
            attribute = ""
            if len(op) > 2 and tag == "code":
                attribute = ' class="language-' + _escape(op[2]) + '"'
            elif len(op) > 2 and tag == "ol":
                attribute = ' start="' + _escape(op[2]) + '"'
            parts.append("<" + tag + attribute + ">")
            stack.append(tag)
        else:
            parts.append("</" + stack.pop() + ">")
    return "".join(parts)
