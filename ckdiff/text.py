"""Text shown on a terminal: control characters in names and paths are escaped."""
from __future__ import annotations

import re

# C0 and C1 controls, DEL, the invisible direction/line-separator marks that can reorder or
# hide what a terminal shows, and lone surrogates (which a strict terminal encoding cannot print).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff"
                     "\ud800-\udfff]")  # last: bytes of a file name that are not UTF-8 (surrogate escapes)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match) -> str:
    c = m.group()
    if c in _NAMED:
        return _NAMED[c]
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def printable(s) -> str:
    """``s`` with every control character written as an escape (``\\x1b``, ``\\n``, ``\\u202e``).

    Plain text is returned unchanged, and applying it twice changes nothing more.
    """
    s = str(s)
    return _UNSAFE.sub(_escape, s) if _UNSAFE.search(s) else s



# ---------------------------------------------------------------- one escaping function per sink
# Every name, path, note or command that reaches a report or the terminal passes through one of these;
# each starts from ``printable``, so control characters and direction marks never reach any sink raw.

def terminal(s) -> str:
    """For ``rich`` console output with markup on: ``printable`` plus rich's markup escaping."""
    from rich.markup import escape
    return escape(printable(s))


def html_text(s) -> str:
    """For HTML text and attribute values (quoted): ``printable`` plus ``& < > " '`` as entities."""
    import html
    return html.escape(printable(s), quote=True)


# what can start markup in CommonMark/GFM text: code spans, emphasis, links and images, HTML tags and
# entities, table cells, strikethrough; ``_`` only where it can open or close emphasis (not inside a word)
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>&|~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")


def md_text(s) -> str:
    """For Markdown text, table cells included: ``printable`` plus a backslash before every character
    that could start markup, so no name can open a code span, a link, an image, a tag, an entity or a
    table cell (in a GFM table ``\\|`` stays inside its cell). Names stay readable: ``a.b_c`` is unchanged."""
    return _MD_SPECIAL.sub(r"\\\1", printable(s))


def md_cell(s) -> str:
    """For a Markdown table cell holding prose (a diagnosis, a detail): line breaks, which would end the
    row, become spaces; then ``md_text``."""
    return md_text(re.sub(r"\s*[\r\n]+\s*", " ", str(s)))


def md_code(s) -> str:
    """A name set in monospace in Markdown: ``<code>`` around ``md_text`` (a backtick code span could be
    closed by a backtick in the name)."""
    return f"<code>{md_text(s)}</code>"
