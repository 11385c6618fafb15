"""No process-wide state changed by the library or the command layer when called in-process."""
from __future__ import annotations

import warnings

from ckdiff.commands import main


def test_main_leaves_the_callers_warning_filters_as_they_were(tmp_path):
    before = list(warnings.filters)
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert list(warnings.filters) == before
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.warn("still shown", UserWarning)
    assert [str(w.message) for w in seen] == ["still shown"]
