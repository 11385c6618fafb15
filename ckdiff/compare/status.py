"""The status of one compared tensor, its order in reports and which statuses pass: defined once here.

Status values are ``str`` subclasses whose text is the JSON value (``ckdiff.result/1``), so a result
serialises, prints and compares with plain strings exactly as before.
"""
from __future__ import annotations

from enum import Enum
from typing import Optional


class Status(str, Enum):
    EQUAL = "equal"          # bytes identical
    CLOSE = "close"          # within an explicit tolerance, same dtype
    CAST = "cast"            # dtypes differ, values within the cast's rounding
    QUANT = "quant"          # dequantized, within its scale bound
    REORDERED = "reordered"  # differs only by a permutation applied consistently across tensors (same function)
    DTYPE = "dtype"          # a cast refused by --strict-dtype
    DIFFER = "differ"        # over tolerance
    SHAPE = "shape"          # shapes differ
    ONLY_A = "only-a"        # present in A only
    ONLY_B = "only-b"        # present in B only

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def ok(self) -> bool:
        return self in OK

    @property
    def rank(self) -> int:
        return ORDER[self]


# the statuses that pass
OK = frozenset({Status.EQUAL, Status.CLOSE, Status.CAST, Status.QUANT, Status.REORDERED})
# one order for every report and listing: the worst first (missing, shape, differ, refused cast, then the passing)
ORDER = {Status.ONLY_A: 0, Status.ONLY_B: 0, Status.SHAPE: 1, Status.DIFFER: 2, Status.DTYPE: 3, Status.CAST: 4,
         Status.QUANT: 5, Status.REORDERED: 6, Status.CLOSE: 6, Status.EQUAL: 7}
UNKNOWN_RANK = 9


def rank(status) -> int:
    """The sort rank of a status (a Status or its JSON text)."""
    try:
        return ORDER[Status(status)]
    except ValueError:
        return UNKNOWN_RANK


def is_ok(status) -> bool:
    try:
        return Status(status) in OK
    except ValueError:
        return False


# a suite check's outcome: True passed, False failed, None skipped (a logit check with nothing to judge)
def ok_text(ok: Optional[bool]) -> str:
    return {True: "yes", False: "NO"}.get(ok, "skip")


def tally(checks) -> str:
    passed = sum(c.ok is True for c in checks)
    skipped = sum(c.ok is None for c in checks)
    return f"{passed}/{len(checks) - skipped} checks passed" + (f", {skipped} skipped" if skipped else "")


__all__ = ["Status", "OK", "ORDER", "rank", "is_ok", "ok_text", "tally"]
