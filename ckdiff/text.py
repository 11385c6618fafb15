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

