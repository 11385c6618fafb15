"""The one unpickling policy for every pickle ckdiff reads.

Pickles reach ckdiff from DCP ``.metadata`` files, the ``data.pkl`` of every torch.save archive
(``.bin``/``.pt``/``.pth``, Meta ``consolidated.*.pth``, Megatron-LLM rank files, DCP chunks and byte
items, Megatron-Core ``common.pt``) and the five pickles of a legacy (pre-zip) torch file. All of them
go through ``RestrictedUnpickler`` below; none is handed to ``pickle.load`` or to
``torch.load(weights_only=False)`` (only ``--trust-pickle`` does that, in io/pickles.py).

The unpickler is Python's own pure-Python one (``pickle._Unpickler``) with every opcode that can
create an object or allocate memory under a budget decided before it happens:

- globals resolve only through a ``Policy`` allowlist: no name from the file reaches ``import``;
  allowlisted callables are classes and functions that build data from data (dataclasses,
  enums, ``torch.Size``, tensor rebuilders that check their storage first); foreign classes a
  training run pickles into its state (numpy rng state, Megatron enums) become inert ``Opaque``
  stand-ins where the policy allows them;
- the memo is a dict and its indices must come in sequence (a ``LONG_BINPUT 2**28`` is refused,
  never sized);
- nesting is bounded (``MAX_DEPTH``): a 300k-deep tuple would crash the interpreter when hashed;
- byte and string operands are read from a bounded stream: a length larger than what is left of the
  pickle is refused before any buffer is allocated;
- tensors are views of a memory map of the file, built only after their shape, strides and offset
  are checked against the bytes their storage record holds (a 1 KB storage never claims 16 GiB).

Refusals are ``InputError``: one line naming the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import math
import pathlib
import pickle
import struct
import types
import typing
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ckdiff.errors import InputError

MAX_DEPTH = 100  # containers within containers; real checkpoints stay under 20
MAX_PICKLE_BYTES = 512 << 20  # one pickle (a data.pkl record, a .metadata file); real ones are far smaller
# What one pickle read by the pure-Python unpickler may cost, checked by the pre-scan before it runs:
# opcodes (~1.5 µs each: 25 s at most; a 10^5-tensor .bin's data.pkl has ~3 M) and the estimated bytes
# of the objects it builds (io/pickle_scan.py)
MAX_OPS = 1 << 24
MAX_OBJECT_BYTES = 1 << 30
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001


class Refusal(Exception):
    """Raised inside the unpickler; the loader turns it into an InputError naming the file.
    ``tensor``: the refusal is about a tensor, which the unpickler names by its pending dict key."""

    def __init__(self, msg, tensor=False):
        super().__init__(msg)
        self.tensor = tensor


class Opaque:
    """An allowlisted foreign object (a numpy array in an rng state, a Megatron enum) kept inert:
    it remembers the data it was given and never runs anything."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return "<opaque>"


class _StorageRef:
    """A persistent id resolved: ``nbytes`` of element type ``dtype`` at a known place (or not yet)."""

    __slots__ = ("key", "dtype", "nbytes", "storage", "start")

    def __init__(self, key, dtype, nbytes, storage, start=None):
        self.key, self.dtype, self.nbytes, self.storage, self.start = key, dtype, nbytes, storage, start


# ---------------------------------------------------------------- checked constructors
def _int(x, what) -> int:
    if type(x) is not int or x < 0:
        raise Refusal(f"{what} is {type(x).__name__} {x!r:.40}, expected a non-negative int")
    return x


def _ints(xs, what) -> tuple:
    if not isinstance(xs, (tuple, list)):
        raise Refusal(f"{what} is a {type(xs).__name__}, expected a tuple of ints")
    return tuple(_int(x, what) for x in xs)


def layout_problem(shape, stride, offset: int, itemsize: int, storage_nbytes: int) -> str | None:
    """Why (shape, stride, offset) cannot be a view of a storage of ``storage_nbytes``, or None.

    Accepted: strided, non-overlapping elements inside the storage (views, transposes, slices of a
    larger storage and storages shared by tied weights all qualify); a stride-0 ``expand`` of 1 KB
    claiming 16 GiB is refused before anything is built.
    """
    if len(shape) != len(stride):
        return f"shape {list(shape)} and strides {list(stride)} differ in length"
    if any(s == 0 for s in shape):
        return None if offset * itemsize <= storage_nbytes else "starts past the end of its storage"
    span = 1  # elements reached by the dimensions checked so far, innermost (smallest stride) first
    for st, sz in sorted((st, sz) for sz, st in zip(shape, stride) if sz > 1):
        if st < span:
            return (f"shape {list(shape)} with strides {list(stride)} reuses its storage "
                    f"({math.prod(shape) * itemsize} bytes claimed from {storage_nbytes} stored)")
        span += st * (sz - 1)
    if (offset + span) * itemsize > storage_nbytes:
        return f"shape {list(shape)} with strides {list(stride)} reaches past its storage"
    return None


def _tensor(storage, offset, size, stride, dtype=None) -> torch.Tensor:
    if not isinstance(storage, _StorageRef):
        raise Refusal("a tensor without a storage record")
    offset, size, stride = _int(offset, "storage offset"), _ints(size, "tensor size"), _ints(stride, "tensor stride")
    dtype = dtype or storage.dtype
    if not isinstance(dtype, torch.dtype):
        raise Refusal("a tensor without a torch dtype")
    problem = layout_problem(size, stride, offset, dtype.itemsize, storage.nbytes)
    if problem:
        raise Refusal(problem, tensor=True)
    if storage.storage is None:  # the first pass over a legacy file: layout checked, storage not placed yet
        return torch.empty(0, dtype=dtype)
    t = torch.empty(0, dtype=dtype).set_(storage.storage, offset, size, stride)
    t._ckdiff_file_offset = storage.start + offset * dtype.itemsize  # see file_offset
    return t


def file_offset(t: torch.Tensor) -> int:
    """Byte offset in its file of the first element of a tensor read by ``load_torch``."""
    return t._ckdiff_file_offset


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, torch.dtype):
        raise Refusal("a tensor whose dtype is not a torch dtype")
    return _tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise Refusal("a parameter that is not a tensor")
    return data


class _ParameterType:
    """``torch.nn.Parameter`` as a type tag only (``_rebuild_from_type_v2`` names it)."""


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter) or \
            new_type not in (torch.Tensor, _ParameterType) or not isinstance(args, tuple):
        raise Refusal("a tensor rebuilt through an unexpected function")
    return func(*args)


def _codecs_encode(s, encoding="latin1"):
    if not isinstance(s, str) or encoding not in ("latin1", "latin-1"):
        raise Refusal("_codecs.encode of anything but a latin1 string")
    return s.encode("latin1")


def _size(dims=()):
    return torch.Size(_ints(dims, "torch.Size"))


def _device(spec="cpu", index=None):
    if not isinstance(spec, str) or len(spec) > 32 or (index is not None and type(index) is not int):
        raise Refusal("torch.device of something but a short name")
    return "cpu"  # everything is read to the CPU


def _collection(kind):
    def make(items=()):
        if not isinstance(items, (list, tuple, set, frozenset)):
            raise Refusal(f"{kind.__name__} of a {type(items).__name__}")
        return kind(items)
    return make


def _windows_path(*parts):
    if not all(isinstance(p, str) for p in parts):
        raise Refusal("a path made of something but strings")
    return pathlib.PureWindowsPath(*parts)  # WindowsPath cannot be instantiated on POSIX


def _posix_path(*parts):
    if not all(isinstance(p, str) for p in parts):
        raise Refusal("a path made of something but strings")
    return pathlib.PurePosixPath(*parts)


# ---------------------------------------------------------------- policies
@dataclasses.dataclass
class Policy:
    """What one kind of pickle may name: ``allowed`` (module, name) -> object, and the module
    prefixes whose classes become inert ``Opaque`` stand-ins. ``what`` names the kind in refusals."""
    what: str
    allowed: dict
    opaque: tuple = ()
    slims: dict = dataclasses.field(default_factory=dict)  # dataclass -> its slim stand-in (io/dcp_pickle.py)


def _base() -> dict:
    ok = {("collections", "OrderedDict"): _collection(OrderedDict), ("builtins", "set"): _collection(set),
          ("builtins", "frozenset"): _collection(frozenset), ("_codecs", "encode"): _codecs_encode,
          ("torch", "Size"): _size}
    for n in dir(torch):
        if isinstance(getattr(torch, n, None), torch.dtype):
            ok[("torch", n)] = getattr(torch, n)
    return ok


def _torch_policy() -> Policy:
    ok = _base()
    ok.update({("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
               ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
               ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
               ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
               ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
               ("torch", "Tensor"): torch.Tensor, ("torch.nn.parameter", "Parameter"): _ParameterType,
               ("torch", "device"): _device,
               ("argparse", "Namespace"): argparse.Namespace, ("types", "SimpleNamespace"): types.SimpleNamespace,
               ("pathlib", "PosixPath"): _posix_path, ("pathlib", "PurePosixPath"): _posix_path,
               ("pathlib", "WindowsPath"): _windows_path, ("pathlib", "PureWindowsPath"): _windows_path})
    for dtype, name in torch.storage._dtype_to_storage_type_map().items():
        ok[("torch", name)] = dtype  # a storage type names only the element type of its storage
    ok[("torch.storage", "UntypedStorage")] = torch.uint8
    ok[("torch", "UntypedStorage")] = torch.uint8
    return Policy("torch checkpoint", ok, opaque=("numpy", "megatron", "transformer_engine"))


def _dcp_policy() -> Policy:
    from torch.distributed.checkpoint import filesystem as fs
    from torch.distributed.checkpoint import metadata as md
    from torch.distributed.checkpoint import planner as pl
    ok = _base()
    classes = []
    for mod, names in ((md, ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
                             "MetadataIndex", "StorageMeta", "TensorProperties", "_MEM_FORMAT_ENCODING")),
                       (pl, ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")),
                       (fs, ("_StorageInfo", "_StoragePrefix"))):
        for n in names:
            if hasattr(mod, n):
                ok[(mod.__name__, n)] = getattr(mod, n)
                if dataclasses.is_dataclass(getattr(mod, n)):
                    classes.append(getattr(mod, n))
    try:  # older writers pickled TensorProperties from the sharded-tensor package
        from torch.distributed._shard.sharded_tensor import metadata as old
        ok[(old.__name__, "TensorProperties")] = old.TensorProperties
        ok[(old.__name__, "MEM_FORMAT_ENCODING")] = old.MEM_FORMAT_ENCODING
    except ImportError:
        pass
    ok[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a lookup by name only
    for n in ("PosixPath", "PurePosixPath"):
        ok[("pathlib", n)] = _posix_path
    for n in ("WindowsPath", "PureWindowsPath"):
        ok[("pathlib", n)] = _windows_path
    # megatron-core's dist_checkpointing.save keeps every rank's SavePlan on the Metadata (to reuse the
    # plan at the next save) and its own markers (MCoreMetadata, MCoreSavePlan: inert stand-ins here)
    extra = {md.Metadata: {"all_local_plans": typing.Optional[list], "mcore_data": typing.Any}}
    from ckdiff.io.dcp_pickle import _size, slim_classes
    old_props = ok.get(("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"))
    if old_props is not None and old_props not in classes:
        classes.append(old_props)
    slims = slim_classes(classes, extra)
    ok = {k: slims.get(v, v) if isinstance(v, type) else v for k, v in ok.items()}
    ok[("torch", "Size")] = _size
    return Policy("DCP metadata", ok, opaque=("megatron.core.dist_checkpointing",), slims=slims)


_POLICIES: dict = {}


def policy(kind: str) -> Policy:
    """``"torch"`` (every torch.save archive and legacy torch file) or ``"dcp"`` (DCP ``.metadata``)."""
    if kind not in _POLICIES:
        _POLICIES[kind] = {"torch": _torch_policy, "dcp": _dcp_policy}[kind]()
    return _POLICIES[kind]


def resolve(pol: Policy, module, name, proto: int):
    """The object a pickle's global ``module.name`` stands for under ``pol``; a Refusal otherwise."""
    if not isinstance(module, str) or not isinstance(name, str):
        raise Refusal("a global that is not named by strings")
    if proto < 3:  # protocol 2 names Python 2 modules (__builtin__.set): the same renaming pickle does
        import _compat_pickle
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    obj = pol.allowed.get((module, name))
    if obj is None and any(module == p or module.startswith(p + ".") for p in pol.opaque):
        obj = Opaque
    if obj is None:
        raise Refusal(f"{module[:80]}.{name[:80]} is not allowed in a {pol.what} "
                      "(only plain data, tensors and the format's own classes are read)")
    return obj


# ---------------------------------------------------------------- the unpickler
class _Bounded:
    """A read-only stream over ``data`` that refuses a read longer than what is left, before reading."""

    def __init__(self, stream, left: int):
        self.b, self.left = stream, left

    def read(self, n=-1):
        if n is None or n < 0:
            n = self.left
        if n > self.left:
            raise Refusal(f"an operand of {n} bytes with {self.left} left in the pickle")
        out = self.b.read(n)
        self.left -= len(out)
        return out

    def readinto(self, buf):
        n = len(buf)
        if n > self.left:
            raise Refusal(f"an operand of {n} bytes with {self.left} left in the pickle")
        got = self.b.readinto(buf)
        self.left -= got
        return got

    def readline(self):
        out = self.b.readline(min(self.left, 1 << 16))  # text operands (PUT, GET, INT) are short
        self.left -= len(out)
        return out


class RestrictedUnpickler(pickle._Unpickler):
    """``pickle._Unpickler`` under a ``Policy``, with bounded memo, depth and operands."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, stream, left: int, pol: Policy, storage=None):
        self.source = _Bounded(stream, left)
        super().__init__(self.source)
        self._policy = pol
        self._storage = storage  # persistent id -> _StorageRef (None: persistent ids are refused)
        self._depth: dict = {}  # id(obj) -> (depth, obj); the object is kept so that its id is not reused
        self._globals = set()

    # --- names
    def find_class(self, module, name):
        obj = resolve(self._policy, module, name, self.proto)
        self._globals.add(id(obj))
        return obj

    def load(self):
        try:
            return super().load()
        except Refusal as e:
            if e.tensor:
                raise Refusal(f"tensor {self._pending_key()!r}: {e}; refusing it") from None
            raise

    def _pending_key(self) -> str:
        """The dict key whose value is being built: the last string on the stack (or a frame below)."""
        for frame in [self.stack, *reversed(self.metastack)]:
            for x in reversed(frame):
                if isinstance(x, str):
                    return x[:200]
        return "?"

    def persistent_load(self, pid):
        if self._storage is None:
            raise Refusal(f"persistent ids have no place in a {self._policy.what}")
        return self._storage(pid)

    # --- depth: containers are tracked by id; immutable ones (tuples) exactly, since they are built once
    def _d(self, obj) -> int:
        e = self._depth.get(id(obj))
        return e[0] if e is not None else 0

    def _set(self, obj, depth):
        if depth > MAX_DEPTH:
            raise Refusal(f"objects nested more than {MAX_DEPTH} levels deep")
        if depth > self._d(obj):
            self._depth[id(obj)] = (depth, obj)

    def _after(op, children):
        """Wrap opcode ``op``: the object it leaves on top is one deeper than ``children(self)``."""
        base = pickle._Unpickler.dispatch[op[0]]

        def run(self):
            kids = children(self)
            base(self)
            top = self.stack[-1]
            self._set(top, 1 + max((self._d(k) for k in kids), default=0))
        return run

    def _mark_items(self):
        return list(self.stack)  # the items above the last MARK (pickle._Unpickler keeps them as the stack)

    for _op, _kids in ((pickle.TUPLE, _mark_items), (pickle.LIST, _mark_items), (pickle.DICT, _mark_items),
                       (pickle.FROZENSET, _mark_items), (pickle.TUPLE1, lambda s: s.stack[-1:]),
                       (pickle.TUPLE2, lambda s: s.stack[-2:]), (pickle.TUPLE3, lambda s: s.stack[-3:]),
                       (pickle.REDUCE, lambda s: s.stack[-1:]), (pickle.NEWOBJ, lambda s: s.stack[-1:]),
                       (pickle.NEWOBJ_EX, lambda s: s.stack[-2:])):
        dispatch[_op[0]] = _after(_op, _kids)

    def _grow(op, target, items):
        """Wrap opcode ``op`` that adds ``items(self)`` to ``target(self)`` (a list, dict, set or object)."""
        base = pickle._Unpickler.dispatch[op[0]]

        def run(self):
            t, kids = target(self), items(self)
            if op == pickle.BUILD and (id(t) in self._globals or isinstance(t, (type, types.FunctionType))):
                raise Refusal("a BUILD that would change a class or function")
            base(self)
            self._set(t, 1 + max((self._d(k) for k in kids), default=0))
        return run

    for _op, _t, _k in ((pickle.APPEND, lambda s: s.stack[-2], lambda s: s.stack[-1:]),
                        (pickle.APPENDS, lambda s: s.metastack[-1][-1], lambda s: list(s.stack)),
                        (pickle.SETITEM, lambda s: s.stack[-3], lambda s: s.stack[-2:]),
                        (pickle.SETITEMS, lambda s: s.metastack[-1][-1], lambda s: list(s.stack)),
                        (pickle.ADDITEMS, lambda s: s.metastack[-1][-1], lambda s: list(s.stack)),
                        (pickle.BUILD, lambda s: s.stack[-2], lambda s: s.stack[-1:])):
        dispatch[_op[0]] = _grow(_op, _t, _k)

    # --- memo: indices in sequence, as every pickler writes them
    def _memo_put(self, i):
        if i < 0 or i > len(self.memo):
            raise Refusal(f"memo index {i} out of sequence ({len(self.memo)} entries so far)")
        if not self.stack:
            raise Refusal("memo store with an empty stack")
        self.memo[i] = self.stack[-1]

    def _put(self):
        self._memo_put(int(self.readline()[:-1]))

    def _binput(self):
        self._memo_put(self.read(1)[0])

    def _long_binput(self):
        self._memo_put(struct.unpack("<I", self.read(4))[0])

    dispatch[pickle.PUT[0]] = _put
    dispatch[pickle.BINPUT[0]] = _binput
    dispatch[pickle.LONG_BINPUT[0]] = _long_binput

    def _refuse(self):
        raise Refusal("an opcode that has no place in a checkpoint (INST, OBJ, EXT, out-of-band buffers)")

    for _op in (pickle.INST, pickle.OBJ, pickle.EXT1, pickle.EXT2, pickle.EXT4, pickle.NEXT_BUFFER,
                pickle.READONLY_BUFFER):
        dispatch[_op[0]] = _refuse
    del _op, _kids, _t, _k, _after, _grow, _mark_items


def _prescan(buf, start: int, end: int) -> int:
    """The opcode pre-scan (io/pickle_scan.py) of the pickle at ``buf[start:end]``: its structure,
    memo order, depth, and the opcodes and bytes it would cost, before the unpickler runs; the offset
    just past its STOP."""
    from ckdiff.io.pickle_scan import MESSAGES, scan
    code, at, stop, ops, est = scan(buf, start, end, MAX_DEPTH)
    if code:
        raise Refusal(f"{MESSAGES[code].format(depth=MAX_DEPTH)} (at byte {at - start})")
    if ops > MAX_OPS:
        raise Refusal(f"{ops} opcodes, more than the {MAX_OPS} a checkpoint's pickle needs")
    if est > MAX_OBJECT_BYTES:
        raise Refusal(f"its objects would take about {est >> 20} MiB, more than the {MAX_OBJECT_BYTES >> 20} MiB "
                      "a checkpoint's pickle needs")
    return stop


def _reason(e: BaseException) -> str:
    if isinstance(e, Refusal):
        return str(e)
    if isinstance(e, RecursionError):
        return f"objects nested more than {MAX_DEPTH} levels deep"
    if isinstance(e, MemoryError):
        return "it asks for more memory than there is"
    msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
    return f"{e.__class__.__name__}{': ' + msg if msg else ''}"


def unpickle(data: bytes, path, pol: Policy, storage=None, what="pickle"):
    """One pickle in ``data`` (the whole of it, up to its STOP) under ``pol``; InputError naming ``path``."""
    if len(data) > MAX_PICKLE_BYTES:
        raise InputError(path, f"{what} of {len(data)} bytes is larger than the {MAX_PICKLE_BYTES >> 20} MiB "
                               "a checkpoint's pickle needs; refused")
    u = RestrictedUnpickler(io.BytesIO(data), len(data), pol, storage)
    try:
        _prescan(np.frombuffer(data, dtype=np.uint8), 0, len(data))
        return u.load()
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a hostile or corrupt pickle raises is an input error
        raise InputError(path, f"refused to unpickle the {what}: {_reason(e)}") from None


def load_pickle_bytes(data: bytes, path, kind: str, what="pickle"):
    """A whole pickle (a DCP ``.metadata``) under the policy ``kind``. DCP metadata runs through the C
    unpickler after the opcode pre-scan, with slim stand-ins for DCP's dataclasses (io/dcp_pickle.py):
    a checkpoint of 10^6 chunks has ~10^8 opcodes of metadata."""
    pol = policy(kind)
    if kind != "dcp":
        return unpickle(data, path, pol, None, what)
    if len(data) > MAX_PICKLE_BYTES:
        raise InputError(path, f"{what} of {len(data)} bytes is larger than the {MAX_PICKLE_BYTES >> 20} MiB "
                               "a checkpoint's pickle needs; refused")
    from ckdiff.io import dcp_pickle
    try:
        return dcp_pickle.load(data, lambda m, n, proto: resolve(pol, m, n, proto), MAX_DEPTH)
    except (Refusal, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise InputError(path, f"refused to unpickle the {what}: {str(e)[:300] or type(e).__name__}") from None
    except Exception as e:  # noqa: BLE001 - whatever a hostile or corrupt pickle raises is an input error
        raise InputError(path, f"refused to unpickle the {what}: {_reason(e)}") from None


# ---------------------------------------------------------------- torch files (zip archives and legacy files)
class _Mapped:
    """Memory maps of input files, one per file, shared by every tensor read from it."""

    _maps: "OrderedDict[str, torch.UntypedStorage]" = OrderedDict()

    @classmethod
    def of(cls, path: Path, size: int) -> torch.UntypedStorage:
        key = f"{path}:{size}"
        m = cls._maps.get(key)
        if m is None:
            m = cls._maps[key] = torch.UntypedStorage.from_file(str(path), False, size)
            while len(cls._maps) > 64:
                cls._maps.popitem(last=False)
        return m


class _Window(io.RawIOBase):
    """A read-only file view of ``[offset, offset + length)`` (one archive inside a larger file)."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.base, self.n, self.pos = f, offset, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        self.pos = {0: pos, 1: self.pos + pos, 2: self.n + pos}[whence]
        return self.pos

    def readinto(self, b):
        k = max(0, min(len(b), self.n - self.pos))
        self.f.seek(self.base + self.pos)
        got = self.f.readinto(memoryview(b)[:k])
        self.pos += got
        return got


def _record_start(f, base: int, info: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored record's data (past its local header)."""
    f.seek(base + info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise Refusal(f"record {info.filename[:80]!r} has no local header")
    nlen, xlen = struct.unpack("<HH", head[26:30])
    return base + info.header_offset + 30 + nlen + xlen


def _storage_resolver(records, mapped, what_file):
    """persistent_load for an archive: ('storage', type, key, location, numel) -> a checked storage view."""
    seen: dict = {}

    def resolve(pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise Refusal("a persistent id that is not a storage")
        dtype, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str):
            raise Refusal("a storage without an element type or key")
        nbytes = _int(numel, "storage size") * dtype.itemsize  # UntypedStorage counts bytes: uint8 here
        if key in seen:
            return seen[key]
        rec = records.get(key)
        if rec is None:
            raise Refusal(f"storage {key[:40]!r} has no data record")
        start, length = rec
        if nbytes != length:
            raise Refusal(f"storage {key[:40]!r} claims {nbytes} bytes; its record holds {length}")
        ref = _StorageRef(key, dtype, nbytes, mapped[start:start + length] if length else torch.UntypedStorage(0),
                          start)
        seen[key] = ref
        return ref
    return resolve


def load_torch(path, window: tuple | None = None, what="torch checkpoint"):
    """A torch.save archive (zip) or legacy torch file at ``path`` (``window``: (offset, length) of the
    archive inside a larger file, as a DCP chunk), read under the torch policy with tensors mapped."""
    from ckdiff.io.inputs import open_input
    path = Path(path)
    pol = policy("torch")
    try:
        with open_input(path) as f:
            size = f.seek(0, 2)
            base, length = window if window is not None else (0, size)
            if base < 0 or length < 0 or base + length > size:
                raise Refusal("the byte range lies outside the file")
            f.seek(base)
            magic = f.read(2)
            if magic == b"PK":
                return _load_zip(f, path, base, length, size, pol, what)
            if magic[:1] == b"\x80":
                return _load_legacy(f, path, base, length, size, pol, what)
            raise Refusal("not a torch zip or pickle file" if magic else "empty file")
    except InputError:
        raise
    except PermissionError as e:
        raise InputError(path, f"cannot read: {e.strerror}") from None
    except Refusal as e:
        raise InputError(path, f"refused to read the {what}: {e}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, KeyError, EOFError, struct.error,
            OverflowError, RuntimeError, IndexError) as e:
        raise InputError(path, f"not a readable {what} ({_reason(e)})") from None


def _load_zip(f, path, base, length, size, pol, what):
    z = zipfile.ZipFile(io.BufferedReader(_Window(f, base, length)))
    infos = z.infolist()
    pkl = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
    if len(pkl) != 1:
        raise Refusal("not a torch.save archive (no single data.pkl)")
    prefix = pkl[0].filename[: -len("data.pkl")]
    names = {i.filename: i for i in infos}
    bo = names.get(prefix + "byteorder")
    if bo is not None and (bo.file_size > 16 or z.read(bo) != b"little"):
        raise Refusal("big-endian torch archives are not supported")
    records = {}
    for i in infos:
        if not i.filename.startswith(prefix + "data/"):
            continue
        if i.compress_type != zipfile.ZIP_STORED or i.compress_size != i.file_size:
            raise Refusal(f"record {i.filename[:80]!r} is compressed (torch writes stored records)")
        start = _record_start(f, base, i)
        if start + i.file_size > base + length:
            raise Refusal(f"record {i.filename[:80]!r} runs past the end of the archive")
        records[i.filename[len(prefix) + 5:]] = (start, i.file_size)
    if pkl[0].compress_type != zipfile.ZIP_STORED or pkl[0].file_size > MAX_PICKLE_BYTES:
        raise Refusal(f"data.pkl is compressed or larger than {MAX_PICKLE_BYTES >> 20} MiB")
    start = _record_start(f, base, pkl[0])
    f.seek(start)
    data = f.read(pkl[0].file_size)
    mapped = _Mapped.of(path, size) if records and size else None
    return unpickle(data, path, pol, _storage_resolver(records, mapped, path), what)


def _one_pickle(f, path, pol, storage=None, what="pickle", end=None):
    """The pickle starting at ``f``'s position (a legacy file's pickles follow each other, then raw
    storages); ``f`` is left just past its STOP."""
    start = f.tell()
    u = RestrictedUnpickler(f, min(MAX_PICKLE_BYTES, end - start), pol, storage)
    try:
        import mmap
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            buf = np.frombuffer(m, dtype=np.uint8)
            try:
                _prescan(buf, start, min(end, start + MAX_PICKLE_BYTES))
            finally:
                del buf  # the map closes only once no array points into it
        return u.load()
    except Exception as e:  # noqa: BLE001 - whatever a hostile or corrupt pickle raises is an input error
        raise InputError(path, f"refused to unpickle the {what}: {_reason(e)}") from None


def _load_legacy(f, path, base, length, size, pol, what):
    """A pre-1.6 torch file: magic number, protocol, sys_info, the object, the storage keys, then each
    storage as an 8-byte element count and its bytes. Every pickle goes through the restricted
    unpickler; storages are placed by walking the counts, then the object is read again with them."""
    f.seek(base)
    end = base + length
    if _one_pickle(f, path, pol, end=end, what=f"{what} (magic number pickle)") != LEGACY_MAGIC:
        raise Refusal("not a torch file (wrong magic number)")
    if _one_pickle(f, path, pol, end=end, what=f"{what} (protocol pickle)") != LEGACY_PROTOCOL:
        raise Refusal("unsupported legacy torch protocol")
    info = _one_pickle(f, path, pol, end=end, what=f"{what} (sys_info pickle)")
    if not isinstance(info, dict) or info.get("little_endian") is False:
        raise Refusal("big-endian or malformed legacy torch file")
    main_at = f.tell()
    pids: dict = {}

    def collect(pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise Refusal("a persistent id that is not a storage")
        dtype, key, numel = pid[1], pid[2], _int(pid[4], "storage size")
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str):
            raise Refusal("a storage without an element type or key")
        if len(pid) > 5 and pid[5] is not None:
            raise Refusal("legacy storage views are not supported")
        pids.setdefault(key, (dtype, numel))
        return _StorageRef(key, dtype, numel * dtype.itemsize, None)

    _one_pickle(f, path, pol, collect, what, end)
    keys = _one_pickle(f, path, pol, end=end, what=f"{what} (storage keys pickle)")
    if not isinstance(keys, list) or set(keys) != set(pids) or len(keys) != len(pids):
        raise Refusal("the storage keys do not match the storages the object names")
    pos, records = f.tell(), {}
    for k in keys:
        dtype, numel = pids[k]
        f.seek(pos)
        raw = f.read(8)
        if len(raw) != 8 or struct.unpack("<q", raw)[0] != numel:
            raise Refusal(f"storage {k[:40]!r} does not hold the {numel} elements it claims")
        n = numel * dtype.itemsize
        if pos + 8 + n > base + length:
            raise Refusal(f"storage {k[:40]!r} runs past the end of the file")
        records[k] = (pos + 8, n)
        pos += 8 + n
    mapped = _Mapped.of(path, size) if records and size else None
    seen: dict = {}

    def place(pid):
        key = pid[2]
        if key not in seen:
            start, n = records[key]
            seen[key] = _StorageRef(key, pids[key][0], n, mapped[start:start + n] if n else torch.UntypedStorage(0),
                                    start)
        return seen[key]

    f.seek(main_at)
    return _one_pickle(f, path, pol, place, what, end)
