"""A linear pre-scan of a pickle's opcodes, before any object is built.

The scan walks the opcode stream once with an abstract stack (no objects: each stack slot is a
nesting depth and a flag saying whether it holds a global found by name) and checks what an
unpickler would otherwise discover too late:

- every opcode is one a checkpoint can contain (no INST/OBJ/EXT, no out-of-band buffers), every
  operand lies inside the pickle, the stack never underflows and a STOP ends it;
- memo stores come in sequence (a ``LONG_BINPUT 2**28`` would size a table of 2**28 slots);
- containers nest at most ``max_depth`` deep, memo references included (hashing a 300k-deep tuple
  used as a dict key recurses in C and crashes the interpreter);
- a BUILD never targets a global (it would set attributes on an allowlisted class or function);
- the objects it would create are counted: the number of opcodes, and an estimate of the bytes
  they keep alive (object headers, container slots, dict entries with their slack), which callers
  bound before anything is allocated (a 512 MiB pickle of ``EMPTY_SET`` and ``APPEND`` pairs builds
  ~50 GiB of sets).

The same function runs as Python for small pickles (no compile, no numba import) and compiled by
numba for large ones (``scan``): ~1 µs an opcode against ~10 ns.
"""
from __future__ import annotations

import numpy as np

# Result codes (index into MESSAGES); 0 is success.
OK, TRUNCATED, BAD_OPCODE, UNDERFLOW, MEMO_ORDER, MEMO_MISSING, TOO_DEEP, BUILD_GLOBAL, BAD_TEXT, NO_MARK = range(10)
GROW = 10  # not an error: the scan stopped for larger arrays and resumes from ``state``
MESSAGES = {
    TRUNCATED: "it ends inside an opcode or its operand, or before its STOP",
    BAD_OPCODE: "an opcode that has no place in a checkpoint (INST, OBJ, EXT, out-of-band buffers or an unknown byte)",
    UNDERFLOW: "an opcode that takes more items than the stack holds",
    MEMO_ORDER: "a memo index stored out of sequence",
    MEMO_MISSING: "a memo index read before it is stored",
    TOO_DEEP: "objects nested more than {depth} levels deep",
    BUILD_GLOBAL: "a BUILD that would change a class or function",
    BAD_TEXT: "a text operand that is not a number",
    NO_MARK: "an opcode that needs a MARK with none open",
}

# bytes an object kept alive costs (CPython 3.11, 64-bit), used for the estimate
_SLOT = 8  # a pointer in a list, tuple or the memo
_ENTRY = 72  # a dict entry with the table's slack
_SET_ENTRY = 40
_INT, _FLOAT, _STR, _BYTES = 32, 24, 56, 40
_LIST, _DICT, _SET, _TUPLE = 56, 64, 216, 40
_OBJECT = 216  # the result of a REDUCE or NEWOBJ: an instance (slots or a small dict), a set, a dtype


def _scan(buf, start, end, max_depth, remap, out, dep, glo, mdep, mglo, mref, marks, state):
    """Scan the pickle at ``buf[start:end]``. Returns (code, position, stop, opcodes, bytes, referenced,
    written): ``code`` 0 and ``stop`` the offset just past STOP on success, otherwise the error code
    and the offset of the opcode at fault; ``referenced[i]`` is 1 where memo entry ``i`` is read back.

    With a non-empty ``out`` the scan also writes the pickle again into ``out`` (``written`` bytes)
    without its frames and without the memo stores nothing reads back (``remap[i]``: the new index
    of entry ``i``, -1 to drop it): the unpickler's memo then keeps alive only what is shared, not
    every state dict and argument tuple it has built.

    The abstract stack (``dep`` depth, ``glo`` is-global), the memo (``mdep``, ``mglo``, ``mref``) and the
    MARK heights (``marks``) are the caller's arrays, never reallocated here (a compiled loop that
    reassigns arrays pays reference counting on every opcode: 6x slower): when one is full the scan
    saves its place in ``state`` (position, stack height, memo size, marks, opcodes, bytes, written) and
    returns GROW; ``_run`` enlarges it and calls again."""
    rewrite = out.shape[0] > 0
    pos, sp, nmemo, nmarks, ops, est, o = state[0], state[1], state[2], state[3], state[4], state[5], state[6]
    while pos < end:
        if sp + 2 >= dep.shape[0] or nmemo + 1 >= mdep.shape[0] or nmarks + 1 >= marks.shape[0]:
            state[0], state[1], state[2], state[3], state[4], state[5], state[6] = pos, sp, nmemo, nmarks, ops, est, o
            return GROW, pos, 0, ops, est, mref[:nmemo], o
        at = pos
        op = np.int64(buf[pos])
        pos += 1
        ops += 1
        base = marks[nmarks - 1] if nmarks > 0 else 0
        push = -1  # depth of the slot pushed by this opcode, if any
        copy = True  # rewriting: the opcode goes to ``out`` as it is
        get = -1  # rewriting: a memo read of this entry
        put = -1  # rewriting: a memo store of this entry
        if op == 0x2E:  # STOP
            if sp < 1:
                return UNDERFLOW, at, 0, ops, est, mref[:nmemo], o
            if rewrite:
                out[o] = op
                o += 1
            return OK, at, pos, ops, est, mref[:nmemo], o
        elif op == 0x95:  # FRAME: 8-byte length; the opcodes follow
            if pos + 8 > end:
                return TRUNCATED, at, 0, ops, est, mref[:nmemo], o
            pos += 8
            copy = False
        elif op == 0x80:  # PROTO
            if pos + 1 > end:
                return TRUNCATED, at, 0, ops, est, mref[:nmemo], o
            pos += 1
        elif op == 0x28:  # MARK
            marks[nmarks] = sp
            nmarks += 1
        elif op == 0x4E or op == 0x88 or op == 0x89:  # NONE, NEWTRUE, NEWFALSE
            push = 0
        elif op == 0x4B:  # BININT1
            if pos + 1 > end:
                return TRUNCATED, at, 0, ops, est, mref[:nmemo], o
            pos += 1
            push = 0
        elif op == 0x4D:  # BININT2
            if pos + 2 > end:
                return TRUNCATED, at, 0, ops, est, mref[:nmemo], o
            pos += 2
            push = 0
            est += _INT
        elif op == 0x4A:  # BININT
            if pos + 4 > end:
                return TRUNCATED, at, 0, ops, est, mref[:nmemo], o
            pos += 4
            push = 0
            est += _INT
        elif op == 0x47:  # BINFLOAT
            if pos + 8 > end:
                return TRUNCATED, at, 0, ops, est, mref[:nmemo], o
            pos += 8
            push = 0
            est += _FLOAT
        elif op == 0x8A or op == 0x55 or op == 0x43 or op == 0x8C:  # LONG1, SHORT_BINSTRING, SHORT_BINBYTES, SHORT_BINUNICODE
            if pos + 1 > end:
                return TRUNCATED, at, 0, ops, est, mref[:nmemo], o
            n = np.int64(buf[pos])
            pos += 1
            if pos + n > end:
                return TRUNCATED, at, 0, ops, est, mref[:nmemo], o
            pos += n
            push = 0
            est += _STR + 2 * n
        elif op == 0x8B or op == 0x54 or op == 0x42 or op == 0x58:  # LONG4, BINSTRING, BINBYTES, BINUNICODE
            if pos + 4 > end:
                return TRUNCATED, at, 0, ops, est, mref[:nmemo], o
            n = np.int64(0)
            for k in range(4):
                n |= np.int64(buf[pos + k]) << (8 * k)
            pos += 4
            if pos + n > end:
                return TRUNCATED, at, 0, ops, est, mref[:nmemo], o
            pos += n
            push = 0
            est += _STR + 2 * n
        elif op == 0x8D or op == 0x8E or op == 0x96:  # BINUNICODE8, BINBYTES8, BYTEARRAY8
            if pos + 8 > end:
                return TRUNCATED, at, 0, ops, est, mref[:nmemo], o
            n = np.int64(0)
            for k in range(7):
                n |= np.int64(buf[pos + k]) << (8 * k)
            if buf[pos + 7] != 0:
                return TRUNCATED, at, 0, ops, est, mref[:nmemo], o
            pos += 8
            if n > end - pos:
                return TRUNCATED, at, 0, ops, est, mref[:nmemo], o
            pos += n
            push = 0
            est += _BYTES + 2 * n
        elif (op == 0x49 or op == 0x4C or op == 0x46 or op == 0x53 or op == 0x56 or op == 0x50
              or op == 0x67 or op == 0x70 or op == 0x63):
            # line operands: INT, LONG, FLOAT, STRING, UNICODE, PERSID, GET, PUT; GLOBAL has two lines
            lines = 2 if op == 0x63 else 1
            value = np.int64(0)
            digits = 0
            for _ in range(lines):
                while pos < end and buf[pos] != 0x0A:
                    if op == 0x67 or op == 0x70:
                        c = buf[pos]
                        if c < 0x30 or c > 0x39 or digits > 12:
                            return BAD_TEXT, at, 0, ops, est, mref[:nmemo], o
                        value = value * 10 + (c - 0x30)
                        digits += 1
                    pos += 1
                if pos >= end:
                    return TRUNCATED, at, 0, ops, est, mref[:nmemo], o
                pos += 1
            if op == 0x67:  # GET
                if digits == 0:
                    return BAD_TEXT, at, 0, ops, est, mref[:nmemo], o
                if value >= nmemo:
                    return MEMO_MISSING, at, 0, ops, est, mref[:nmemo], o
                get = value
                dep[sp] = mdep[value]
                glo[sp] = mglo[value]
                sp += 1
                est += _SLOT
            elif op == 0x70:  # PUT
                if digits == 0:
                    return BAD_TEXT, at, 0, ops, est, mref[:nmemo], o
                if value != nmemo:
                    return MEMO_ORDER, at, 0, ops, est, mref[:nmemo], o
                if sp <= base:
                    return UNDERFLOW, at, 0, ops, est, mref[:nmemo], o
                mdep[value] = dep[sp - 1]
                mglo[value] = glo[sp - 1]
                mref[value] = 0
                put = value
                nmemo += 1
                est += _SLOT
            elif op == 0x63:  # GLOBAL
                dep[sp] = 0
                glo[sp] = 1
                sp += 1
                est += _SLOT
            else:
                push = 0
                est += _STR + (pos - at)
        elif op == 0x68 or op == 0x6A:  # BINGET, LONG_BINGET
            w = 1 if op == 0x68 else 4
            if pos + w > end:
                return TRUNCATED, at, 0, ops, est, mref[:nmemo], o
            value = np.int64(0)
            for k in range(w):
                value |= np.int64(buf[pos + k]) << (8 * k)
            pos += w
            if value >= nmemo:
                return MEMO_MISSING, at, 0, ops, est, mref[:nmemo], o
            get = value
            dep[sp] = mdep[value]
            glo[sp] = mglo[value]
            sp += 1
            est += _SLOT
        elif op == 0x71 or op == 0x72 or op == 0x94:  # BINPUT, LONG_BINPUT, MEMOIZE
            if op == 0x94:
                value = np.int64(nmemo)
            else:
                w = 1 if op == 0x71 else 4
                if pos + w > end:
                    return TRUNCATED, at, 0, ops, est, mref[:nmemo], o
                value = np.int64(0)
                for k in range(w):
                    value |= np.int64(buf[pos + k]) << (8 * k)
                pos += w
            if value != nmemo:
                return MEMO_ORDER, at, 0, ops, est, mref[:nmemo], o
            if sp <= base:
                return UNDERFLOW, at, 0, ops, est, mref[:nmemo], o
            mdep[value] = dep[sp - 1]
            mglo[value] = glo[sp - 1]
            mref[value] = 0
            put = value
            nmemo += 1
            est += _SLOT
        elif op == 0x5D or op == 0x7D or op == 0x8F or op == 0x29:  # EMPTY_LIST, EMPTY_DICT, EMPTY_SET, EMPTY_TUPLE
            push = 1
            est += _LIST if op == 0x5D else (_DICT if op == 0x7D else (_SET if op == 0x8F else 0))
        elif op == 0x32:  # DUP
            if sp <= base:
                return UNDERFLOW, at, 0, ops, est, mref[:nmemo], o
            dep[sp] = dep[sp - 1]
            glo[sp] = glo[sp - 1]
            sp += 1
            est += _SLOT
        elif op == 0x30:  # POP: the top item, or the open MARK when nothing is above it
            if sp > base:
                sp -= 1
            elif nmarks > 0:
                nmarks -= 1
            else:
                return UNDERFLOW, at, 0, ops, est, mref[:nmemo], o
        elif op == 0x31:  # POP_MARK
            if nmarks == 0:
                return NO_MARK, at, 0, ops, est, mref[:nmemo], o
            sp = base
            nmarks -= 1
        elif op == 0x93:  # STACK_GLOBAL: module and name strings -> a global
            if sp - 2 < base:
                return UNDERFLOW, at, 0, ops, est, mref[:nmemo], o
            sp -= 2
            dep[sp] = 0
            glo[sp] = 1
            sp += 1
        elif op == 0x51:  # BINPERSID: the id -> an object
            if sp <= base:
                return UNDERFLOW, at, 0, ops, est, mref[:nmemo], o
            dep[sp - 1] = 0
            glo[sp - 1] = 0
            est += _OBJECT
        elif op == 0x85 or op == 0x86 or op == 0x87:  # TUPLE1..3
            n = op - 0x84
            if sp - n < base:
                return UNDERFLOW, at, 0, ops, est, mref[:nmemo], o
            d = 0
            for k in range(sp - n, sp):
                d = max(d, dep[k])
            sp -= n
            push = d + 1
            est += _TUPLE + _SLOT * n
        elif op == 0x74 or op == 0x6C or op == 0x64 or op == 0x91:  # TUPLE, LIST, DICT, FROZENSET from the MARK
            if nmarks == 0:
                return NO_MARK, at, 0, ops, est, mref[:nmemo], o
            d = 0
            for k in range(base, sp):
                d = max(d, dep[k])
            n = sp - base
            sp = base
            nmarks -= 1
            push = d + 1
            if op == 0x74:
                est += _TUPLE + _SLOT * n
            elif op == 0x6C:
                est += _LIST + _SLOT * n
            elif op == 0x64:
                est += _DICT + _ENTRY * (n // 2)
            else:
                est += _SET + _SET_ENTRY * n
        elif op == 0x61 or op == 0x73 or op == 0x62:  # APPEND (1 item), SETITEM (2), BUILD (state)
            n = 2 if op == 0x73 else 1
            if sp - n - 1 < base:
                return UNDERFLOW, at, 0, ops, est, mref[:nmemo], o
            if op == 0x62 and glo[sp - 2] == 1:
                return BUILD_GLOBAL, at, 0, ops, est, mref[:nmemo], o
            d = 0
            for k in range(sp - n, sp):
                d = max(d, dep[k])
            sp -= n
            if d + 1 > dep[sp - 1]:
                dep[sp - 1] = d + 1
            est += _SLOT if op == 0x61 else (_ENTRY if op == 0x73 else 0)
            if dep[sp - 1] > max_depth:
                return TOO_DEEP, at, 0, ops, est, mref[:nmemo], o
        elif op == 0x65 or op == 0x75 or op == 0x90:  # APPENDS, SETITEMS, ADDITEMS: the items above the MARK
            if nmarks == 0:
                return NO_MARK, at, 0, ops, est, mref[:nmemo], o
            outer = marks[nmarks - 2] if nmarks > 1 else 0
            if base - 1 < outer:  # the target sits on the stack the MARK interrupted
                return UNDERFLOW, at, 0, ops, est, mref[:nmemo], o
            d = 0
            for k in range(base, sp):
                d = max(d, dep[k])
            n = sp - base
            sp = base
            nmarks -= 1
            if d + 1 > dep[sp - 1]:
                dep[sp - 1] = d + 1
            if op == 0x65:
                est += _SLOT * n
            elif op == 0x75:
                est += _ENTRY * (n // 2)
            else:
                est += _SET_ENTRY * n
            if dep[sp - 1] > max_depth:
                return TOO_DEEP, at, 0, ops, est, mref[:nmemo], o
        elif op == 0x52 or op == 0x81:  # REDUCE (callable, args), NEWOBJ (cls, args)
            if sp - 2 < base:
                return UNDERFLOW, at, 0, ops, est, mref[:nmemo], o
            d = dep[sp - 1] + 1
            sp -= 2
            push = d
            est += _OBJECT
        elif op == 0x92:  # NEWOBJ_EX (cls, args, kwargs)
            if sp - 3 < base:
                return UNDERFLOW, at, 0, ops, est, mref[:nmemo], o
            d = max(dep[sp - 1], dep[sp - 2]) + 1
            sp -= 3
            push = d
            est += _OBJECT
        else:  # INST, OBJ, EXT1/2/4, NEXT_BUFFER, READONLY_BUFFER, and bytes that are no opcode
            return BAD_OPCODE, at, 0, ops, est, mref[:nmemo], o
        if push >= 0:
            if push > max_depth:
                return TOO_DEEP, at, 0, ops, est, mref[:nmemo], o
            dep[sp] = push
            glo[sp] = 0
            sp += 1
            est += _SLOT
        if get >= 0:
            mref[get] = 1
        if rewrite:
            if get >= 0:
                k = remap[get]
                if k < 256:
                    out[o] = 0x68  # BINGET
                    out[o + 1] = k
                    o += 2
                else:
                    out[o] = 0x6A  # LONG_BINGET
                    for b in range(4):
                        out[o + 1 + b] = (k >> (8 * b)) & 0xFF
                    o += 5
            elif put >= 0:
                if remap[put] >= 0:
                    out[o] = 0x94  # MEMOIZE: the kept entries are stored in order
                    o += 1
            elif copy:
                for b in range(at, pos):
                    out[o] = buf[b]
                    o += 1
    return TRUNCATED, pos, 0, ops, est, mref[:nmemo], o


_COMPILED = None
COMPILE_ABOVE = 256 << 10  # bytes: below this the Python run is faster than loading the compiled one
_NONE = np.zeros(0, dtype=np.int64)
_EMPTY = np.zeros(0, dtype=np.uint8)


def _run(buf, start, end, max_depth, remap, out):
    global _COMPILED
    if end - start <= COMPILE_ABOVE:
        fn = _scan
    else:
        if _COMPILED is None:
            import numba
            _COMPILED = numba.njit(cache=True, nogil=True)(_scan)
        fn = _COMPILED
    dep, glo = np.zeros(1 << 12, dtype=np.int32), np.zeros(1 << 12, dtype=np.uint8)
    mdep, mglo, mref = np.zeros(1 << 12, dtype=np.int32), np.zeros(1 << 12, dtype=np.uint8), np.zeros(1 << 12, dtype=np.uint8)
    marks = np.zeros(1 << 8, dtype=np.int64)
    state = np.array([start, 0, 0, 0, 0, 0, 0], dtype=np.int64)
    while True:
        res = fn(buf, start, end, max_depth, remap, out, dep, glo, mdep, mglo, mref, marks, state)
        if res[0] != GROW:
            return res
        sp, nmemo, nmarks = int(state[1]), int(state[2]), int(state[3])
        if sp + 2 >= dep.shape[0]:
            dep, glo = _doubled(dep, sp), _doubled(glo, sp)
        if nmemo + 1 >= mdep.shape[0]:
            mdep, mglo, mref = _doubled(mdep, nmemo), _doubled(mglo, nmemo), _doubled(mref, nmemo)
        if nmarks + 1 >= marks.shape[0]:
            marks = _doubled(marks, nmarks)


def _doubled(a: np.ndarray, used: int) -> np.ndarray:
    b = np.zeros(a.shape[0] * 2, dtype=a.dtype)
    b[:used] = a[:used]
    return b


def scan(buf: np.ndarray, start: int, end: int, max_depth: int):
    """``_scan`` of ``buf[start:end]`` (a uint8 array), compiled for large pickles: (code, position,
    stop, opcodes, bytes)."""
    return _run(buf, start, end, max_depth, _NONE, _EMPTY)[:5]


def scan_and_prune(buf: np.ndarray, max_depth: int):
    """The scan of the pickle in ``buf``, then the same pickle without frames and without the memo
    stores nothing reads back: (code, position, stop, opcodes, bytes, pruned bytes or None)."""
    res = _run(buf, 0, len(buf), max_depth, _NONE, _EMPTY)
    code, at, stop, ops, est, ref, _ = res
    ref = ref.copy()  # a view of the scan's own memo array
    if code:
        return code, at, stop, ops, est, None
    remap = np.where(ref == 1, np.cumsum(ref, dtype=np.int64) - 1, -1)
    out = np.empty(stop + 8 + 3 * int(ref.sum()), dtype=np.uint8)  # a text GET may grow into a LONG_BINGET
    res2 = _run(buf, 0, stop, max_depth, remap, out)
    return code, at, stop, ops, est, out[: res2[6]].tobytes()
