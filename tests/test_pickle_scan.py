"""The opcode pre-scan (ckdiff/io/pickle_scan.py) against Python's own pickler: every pickle the pickler
writes scans clean to its STOP at every protocol, and the pruned rewrite loads to the same object; the
hostile shapes are refused with their reason. Pickles here are written by Python's pickle module."""
import pickle
import pickletools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ckdiff.io import pickle_scan as ps

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                     st.text(max_size=20), st.binary(max_size=300))
_values = st.recursive(_scalars, lambda c: st.one_of(
    st.lists(c, max_size=5), st.tuples(c, c), st.dictionaries(st.text(max_size=5), c, max_size=5),
    st.frozensets(st.integers(), max_size=4)), max_leaves=30)


def _scan(data: bytes, depth=100):
    return ps.scan(np.frombuffer(data, dtype=np.uint8), 0, len(data), depth)


@settings(max_examples=150, deadline=None)
@given(_values, st.integers(0, 5))
def test_pickler_output_scans_clean_and_prunes_to_the_same_object(obj, proto):
    shared = [obj, obj]  # a shared object: its memo entry is read back and must survive the pruning
    data = pickle.dumps(shared, protocol=proto)
    code, at, stop, ops, est = _scan(data)
    assert code == ps.OK and stop == len(data), (code, at)
    assert ops == sum(1 for _ in pickletools.genops(data))
    code, *_, pruned = ps.scan_and_prune(np.frombuffer(data, dtype=np.uint8), 100)
    assert code == ps.OK and len(pruned) <= len(data)
    got = pickle.loads(pruned)
    assert got == shared
    if isinstance(obj, (list, dict)):
        assert got[0] is got[1]


def test_pruning_drops_what_is_never_read_back():
    data = pickle.dumps([{"a": (1, 2)} for _ in range(50)], protocol=4)
    *_, pruned = ps.scan_and_prune(np.frombuffer(data, dtype=np.uint8), 100)
    stores = sum(1 for op, _, _ in pickletools.genops(pruned) if "PUT" in op.name or op.name == "MEMOIZE")
    assert stores == 2  # the key "a" and the constant tuple (1, 2), which every later dict reads back
    assert pickle.loads(pruned) == pickle.loads(data)


@pytest.mark.parametrize("data,code", [
    (b"\x80\x02}r" + (1 << 28).to_bytes(4, "little") + b".", ps.MEMO_ORDER),
    (b"\x80\x02h\x05.", ps.MEMO_MISSING),
    (b"\x80\x02)" + b"\x85" * 200 + b".", ps.TOO_DEEP),
    (b"\x80\x02cos\nsystem\n}b.", ps.BUILD_GLOBAL),
    (b"\x80\x02]a.", ps.UNDERFLOW),
    (b"\x80\x02ios\nsystem\n.", ps.BAD_OPCODE),
    (b"\x80\x02\x82\x01.", ps.BAD_OPCODE),
    (b"\x80\x02X\xff\xff\xff\x00abc.", ps.TRUNCATED),
    (b"\x80\x02N", ps.TRUNCATED),
    (b"\x80\x02e.", ps.NO_MARK),
    (b"\x80\x02.", ps.UNDERFLOW),
])
def test_hostile_shapes_are_refused(data, code):
    assert _scan(data)[0] == code


def test_build_on_a_global_read_back_from_the_memo_is_refused():
    # GLOBAL, PUT 0, POP, GET 0, EMPTY_DICT, BUILD: the global comes back through the memo
    assert _scan(b"\x80\x02cos\nsystem\nq\x000h\x00}b.")[0] == ps.BUILD_GLOBAL


def test_depth_through_the_memo_counts():
    # a tuple 60 deep stored, then read back twice into a tuple nested 60 more: 120 > 100
    inner = b")" + b"\x85" * 60
    data = b"\x80\x02" + inner + b"q\x00" + b"0" + b"h\x00" + b"\x85" * 60 + b"."
    assert _scan(data)[0] == ps.TOO_DEEP
    assert _scan(data, depth=200)[0] == ps.OK


def test_compiled_and_python_runs_agree(monkeypatch):
    data = pickle.dumps([{"k": i, "v": (i, str(i))} for i in range(40_000)], protocol=4)
    assert len(data) > ps.COMPILE_ABOVE
    compiled = _scan(data)
    monkeypatch.setattr(ps, "COMPILE_ABOVE", len(data) + 1)
    assert _scan(data) == compiled and compiled[0] == ps.OK
