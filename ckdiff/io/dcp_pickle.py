"""DCP ``.metadata`` pickles, read at scale: the C unpickler behind the opcode pre-scan, with slim
stand-ins for DCP's dataclasses.

A DCP checkpoint of 10^6 chunks has a ~190 MB ``.metadata`` pickle of ~10^8 opcodes. The pure-Python
restricted unpickler (io/unpickle.py) needs minutes for it, and DCP's own dataclasses (an instance
dict each, every BUILD's state dict kept alive by the memo until the end) ~3 KB an entry. Here:

- ``pickle_scan.scan`` checks the whole opcode stream first (opcodes, operands, memo order, nesting
  depth, no BUILD on a global, an opcode budget); only then does Python's C unpickler run it;
- globals resolve through the DCP policy's allowlist (io/unpickle.py), except that DCP's dataclasses
  become ``Slim`` classes: the same fields in ``__slots__``, each value type-checked as it is set (the
  declared field types), the state dict emptied once read, unknown fields refused, and a count of
  instances created but never given their state, which must be zero at the end;
- the address space the unpickler may add is capped (``RLIMIT_AS``) for the duration of the load: a
  pickle whose objects would outgrow ``MEMORY_BUDGET`` ends in a MemoryError, reported as a refusal.
  The metadata is read when a checkpoint is opened, before any reader thread starts.
"""
from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import enum
import gc
import io
import os
import pickle
import resource
import types
import typing

import numpy as np
import torch

MEMORY_BUDGET = 1536 << 20  # address space one metadata load may add: a 10^6-entry metadata needs ~1 GiB
MAX_OPS = 1 << 30  # opcodes (the C unpickler runs ~30 M a second)


class _Pending:
    """Slim instances created (NEWOBJ) and not yet given their state (BUILD), for one load."""
    count = 0


def _pred(hint, slims: dict):
    """A check for values of the declared type ``hint``: None (anything goes), a tuple of types (an
    ``isinstance`` check, the common case, kept as a tuple so that unions merge into one call) or a
    predicate."""
    if hint is typing.Any or hint is object:
        return None
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        subs = [_pred(h, slims) for h in typing.get_args(hint)]
        if any(s is None for s in subs):
            return None
        if all(isinstance(s, tuple) for s in subs):
            return tuple(t for s in subs for t in s)
        return lambda v: any(_ok(s, v) for s in subs)
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence):
        kinds = (list, tuple) if origin is collections.abc.Sequence else origin
        args = typing.get_args(hint)
        item = _pred(args[0], slims) if args and origin is not tuple else None
        if item is None:
            return (kinds,) if isinstance(kinds, type) else kinds
        if isinstance(item, tuple):
            return lambda v: isinstance(v, kinds) and all(isinstance(x, item) for x in v)
        return lambda v: isinstance(v, kinds) and all(item(x) for x in v)
    if origin is dict:
        args = typing.get_args(hint)
        kp, vp = (_pred(args[0], slims), _pred(args[1], slims)) if len(args) == 2 else (None, None)
        if (kp is None or isinstance(kp, tuple)) and (vp is None or isinstance(vp, tuple)):
            kt, vt = kp or (object,), vp or (object,)
            return lambda v: isinstance(v, dict) and all(isinstance(k, kt) and isinstance(x, vt) for k, x in v.items())
        return lambda v: isinstance(v, dict) and all(_ok(kp, k) and _ok(vp, x) for k, x in v.items())
    if hint is type(None):
        return (type(None),)
    if hint is os.PathLike:
        return (str, os.PathLike)
    if isinstance(hint, type):
        if hint is float:
            return (int, float)
        return (slims.get(hint, hint),)
    return None  # a hint not modelled (a TypeVar, an unresolved forward reference)


def _ok(check, v) -> bool:
    return check is None or (isinstance(v, check) if isinstance(check, tuple) else check(v))


class Slim:
    """Base of the stand-ins: ``__slots__`` per class; ``_fields`` name -> predicate (or None),
    ``_required`` the fields without a default, ``_defaults`` name -> default factory."""
    __slots__ = ()
    _fields: dict = {}
    _required: tuple = ()
    _defaults: dict = {}
    _source: type = object

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise TypeError(f"{cls.__name__} is built from its state only")
        self = object.__new__(cls)
        for k, make in cls._defaults.items():  # a state without them (or no BUILD at all) leaves these
            object.__setattr__(self, k, make())
        if cls._required:  # an instance of a class with required fields must be given them
            _Pending.count += 1
        return self

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and state[0] is None:
            state = state[1]  # (no dict, slot state)
        if not isinstance(state, dict):
            raise TypeError(f"{type(self).__name__} state is a {type(state).__name__}")
        fields = self._fields
        for k, v in state.items():
            if k not in fields:
                raise TypeError(f"{type(self).__name__} with unknown field {str(k)[:40]!r}")
            check = fields[k]
            if check is not None and not (isinstance(v, check) if type(check) is tuple else check(v)):
                raise TypeError(f"{type(self).__name__}.{k} is a {type(v).__name__}")
            object.__setattr__(self, k, v)
        for k in self._required:
            if k not in state:
                raise TypeError(f"{type(self).__name__} without its field {k!r}")
        state.clear()  # a memo entry read back elsewhere would keep the dict alive: keep it empty
        if self._required:
            _Pending.count -= 1

    def __setattr__(self, k, v):
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k, None)!r}' for k in self._fields)})"


class SlimTensorProperties(Slim):
    """``TensorProperties`` pickles its state as a tuple (dtype, layout, requires_grad, memory format
    code, pin_memory): torch's metadata.py ``__getstate__``."""
    __slots__ = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")

    def __setstate__(self, state):
        if isinstance(state, dict):
            return Slim.__setstate__(self, state)
        if not isinstance(state, tuple) or len(state) != 5:
            raise TypeError("TensorProperties state is not a 5-tuple")
        dtype, layout, grad, fmt, pin = state
        if not isinstance(dtype, torch.dtype) or not isinstance(layout, torch.layout) or \
                not isinstance(grad, bool) or not isinstance(fmt, enum.Enum) or not isinstance(pin, bool):
            raise TypeError("TensorProperties state of the wrong types")
        for k, v in zip(SlimTensorProperties.__slots__, (dtype, layout, grad, fmt, pin)):
            object.__setattr__(self, k, v)
        if self._required:
            _Pending.count -= 1


def slim_classes(sources, extra: dict) -> dict:
    """DCP dataclass -> its Slim stand-in; ``extra``: class -> {attribute: type} beyond its fields."""
    slims: dict = {}
    for cls in sources:
        base = SlimTensorProperties if cls.__name__ == "TensorProperties" else Slim
        names = tuple(f.name for f in dataclasses.fields(cls)) + tuple(extra.get(cls, {}))
        slots = () if base is SlimTensorProperties else names
        slims[cls] = type(cls.__name__, (base,), {"__slots__": slots, "_source": cls, "__module__": __name__})
    for cls, slim in slims.items():
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # noqa: BLE001 - an unresolvable annotation is left unchecked
            hints = {}
        fields = {f.name: _pred(hints.get(f.name, typing.Any), slims) for f in dataclasses.fields(cls)}
        fields.update({k: _pred(h, slims) for k, h in extra.get(cls, {}).items()})
        slim._fields = fields
        slim._required = tuple(f.name for f in dataclasses.fields(cls)
                               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        slim._defaults = {f.name: (f.default_factory if f.default_factory is not dataclasses.MISSING
                                   else (lambda d=f.default: d))
                          for f in dataclasses.fields(cls) if f.name not in slim._required}
        slim._defaults.update({k: (lambda: None) for k in extra.get(cls, {})})
    return slims


_SIZES: dict = {}


def _size(dims=()):
    """``torch.Size`` interned: a metadata of 10^6 chunks names a handful of distinct shapes. Only
    checked dims enter the table, so a hit needs no check."""
    key = tuple(dims) if isinstance(dims, (list, tuple)) else None
    s = _SIZES.get(key)
    if s is not None:
        return s
    if key is None or not all(type(x) is int and x >= 0 for x in key):
        raise TypeError("torch.Size of something other than non-negative ints")
    if len(_SIZES) > 1 << 16:
        _SIZES.clear()
    s = _SIZES[key] = torch.Size(key)
    return s


@contextlib.contextmanager
def address_space(extra: int):
    """``RLIMIT_AS`` lowered to the current address space plus ``extra`` bytes, restored after."""
    try:
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        old = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, ValueError, AttributeError):
        yield  # no /proc or no rlimits here: the opcode budget alone bounds the load
        return
    cap = used + extra
    if old[0] != resource.RLIM_INFINITY and old[0] <= cap:
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (cap, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


class FastUnpickler(pickle.Unpickler):
    """Python's C unpickler with globals from ``resolve`` and no persistent ids."""

    def __init__(self, data: bytes, resolve):
        super().__init__(io.BytesIO(data))
        self._resolve = resolve
        self._proto = data[1] if data[:1] == b"\x80" and len(data) > 1 else 0  # the C unpickler hides it

    def find_class(self, module, name):
        return self._resolve(module, name, self._proto)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids have no place in DCP metadata")


def load(data: bytes, resolve, max_depth: int):
    """The object in ``data`` after the pre-scan; raises ``ValueError`` with the reason on a refusal."""
    from ckdiff.io.pickle_scan import MESSAGES, scan_and_prune
    code, at, _stop, ops, _est, pruned = scan_and_prune(np.frombuffer(data, dtype=np.uint8), max_depth)
    if code:
        raise ValueError(f"{MESSAGES[code].format(depth=max_depth)} (at byte {at})")
    if ops > MAX_OPS:
        raise ValueError(f"{ops} opcodes, more than the {MAX_OPS} a checkpoint's metadata needs")
    _Pending.count = 0
    u = FastUnpickler(pruned, resolve)  # the pruned pickle keeps its PROTO opcode first
    enabled = gc.isenabled()
    gc.disable()  # ~10^7 new containers would start a collection every few hundred: none can form a cycle
    try:
        with address_space(MEMORY_BUDGET):
            obj = u.load()
    except MemoryError:
        raise ValueError(f"its objects need more than the {MEMORY_BUDGET >> 20} MiB a checkpoint's metadata "
                         "needs") from None
    finally:
        if enabled:
            gc.enable()
    if _Pending.count:
        raise ValueError(f"{_Pending.count} DCP metadata object(s) without their fields")
    return obj
