"""Lazy tensors: name, shape and dtype known up front, data read on demand.

Every reader returns a ``Checkpoint``: an ordered mapping of name -> ``LazyTensor``.
Data is read either whole (``load``) or as a range of rows along dim 0 (``rows``),
which is what the comparator uses to stay within a bounded amount of memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

if TYPE_CHECKING:  # torch is imported by the methods that make tensors: a checkpoint's index needs none
    import torch

# Bytes per chunk when streaming a tensor; a few of these are alive at once.
CHUNK_BYTES = 32 * 1024 * 1024


class LazyTensor:
    """A tensor whose data is read only when asked for."""

    # the common fields in slots; "__dict__" keeps every subclass free to add its own attributes, while a
    # subclass that declares slots for all of its own (SafetensorsTensor) never allocates a dict
    __slots__ = ("name", "shape", "dtype", "origin", "__dict__", "__weakref__")

    def __init__(self, name: str, shape: Sequence[int], dtype: torch.dtype, origin: str = ""):
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.origin = origin  # file (or description) the data comes from, for messages

    # -- sizes -----------------------------------------------------------------
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def nrows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_read_bytes(self) -> int:
        """Bytes read to produce one row (sizes a writer's row blocks): the row itself here."""
        return max(1, self.nbytes // max(1, self.nrows))

    def meta(self) -> torch.Tensor:
        """An empty tensor on the meta device with this shape and dtype."""
        import torch
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    # -- data ------------------------------------------------------------------
    def load(self) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0 (for a 0-d tensor: the scalar as shape [1])."""
        t = self.load()
        return t.reshape(1) if t.dim() == 0 else t[start:stop]

    def row_chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int]]:
        """Row ranges covering the tensor, each about ``chunk_bytes`` large."""
        n = self.nrows
        row_bytes = max(1, self.nbytes // max(1, n))
        step = max(1, chunk_bytes // row_bytes)
        for start in range(0, n, step):
            yield start, min(n, start + step)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {list(self.shape)}, {self.dtype})"


class EagerTensor(LazyTensor):
    """Wraps a tensor already in memory (or memory-mapped by torch)."""

    def __init__(self, name: str, tensor: torch.Tensor, origin: str = ""):
        super().__init__(name, tensor.shape, tensor.dtype, origin)
        self._t = tensor

    def load(self) -> torch.Tensor:
        return self._t

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self._t.reshape(1) if self._t.dim() == 0 else self._t[start:stop]


class DerivedTensor(LazyTensor):
    """Output ``index`` of a function of other lazy tensors (a conversion op).

    Tensors derived from one group share its ``OutputCache`` so the op runs once
    while its outputs are written one after the other. When the op only moves
    whole rows (``rowwise``: renames, rotary permutations, QKV fusion and splits,
    concatenations on dim 0), ``rows`` reads just the source rows it needs.
    """

    def __init__(self, name: str, shape, dtype, group: "DerivedGroup", index: int):
        super().__init__(name, shape, dtype, group.origin)
        self.group = group
        self.index = index

    def load(self) -> torch.Tensor:
        return self.group.outputs()[self.index]

    @property
    def row_read_bytes(self) -> int:
        """A row-local output's row costs a row of every input (a per-channel scale of 2 bytes is
        computed from a whole weight row): row blocks are sized by that, not by the output alone."""
        own = max(1, self.nbytes // max(1, self.nrows))
        if self.shape and getattr(self.group.fn, "rowlocal", False):
            return max(own, sum(t.row_read_bytes for t in self.group.inputs))
        return own

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if self.shape and getattr(self.group.fn, "rowlocal", False):  # output rows from the same input rows
            out = self.group.fn([t.rows(start, stop) for t in self.group.inputs])[self.index]
            return out.reshape((stop - start,) + self.shape[1:])
        m = self.group.row_map(self.index) if self.shape else None
        if m is None:
            t = self.load()
            return t.reshape(1) if t.dim() == 0 else t[start:stop]
        return self.group.gather(m[start:stop], (stop - start,) + self.shape[1:], self.dtype)


_SRC_SHIFT = 40  # a row's provenance: input index << 40 | row


class OutputCache:
    """Keeps the computed outputs of the ``keep`` groups computed last; older ones are dropped.

    Owned by whoever derives the tensors (a conversion pass, a quantization) and passed to each
    ``DerivedGroup`` it makes, so the outputs of an op with several outputs (a QKV split, a tie) are
    computed once while they are written one after the other, and memory stays bounded."""

    def __init__(self, keep: int = 1):
        self.keep = max(1, keep)
        self._groups: list = []

    def hold(self, group: "DerivedGroup") -> None:
        if group in self._groups:
            return
        while len(self._groups) >= self.keep:
            self._groups.pop(0)._cache = None
        self._groups.append(group)

    def clear(self) -> None:
        for g in self._groups:
            g._cache = None
        self._groups = []


class DerivedGroup:
    """Runs ``fn(inputs) -> list[Tensor]`` on demand. With a ``cache`` (an ``OutputCache``) the
    outputs stay until the cache drops them; without one nothing is kept between calls."""

    def __init__(self, inputs: Sequence[LazyTensor], fn: Callable[[list], list], origin: str = "",
                 cache: "OutputCache | None" = None):
        self.inputs = list(inputs)
        self.fn = fn
        self.origin = origin or (inputs[0].origin if inputs else "")
        self.cache = cache
        self._cache: list | None = None
        self._maps: list | None = None

    def infer(self) -> list[torch.Tensor]:
        """Shapes and dtypes of the outputs, computed on the meta device."""
        return self.fn([t.meta() for t in self.inputs])

    def outputs(self) -> list[torch.Tensor]:
        if self._cache is not None:
            return self._cache
        out = [o.contiguous() for o in self.fn([t.load() for t in self.inputs])]
        if self.cache is not None:
            self._cache = out
            self.cache.hold(self)
        return out

    def row_map(self, index: int):
        """For a row-moving op: the provenance of each row of output ``index`` (else None).

        The op runs once on small integer tensors holding each input row's provenance
        in place of its data, so the map is exact for whatever the op does with rows."""
        if self._maps is None:
            self._maps = []
            if getattr(self.fn, "rowwise", False) and all(t.shape for t in self.inputs):
                import torch
                provs = [((j << _SRC_SHIFT) + torch.arange(t.shape[0], dtype=torch.int64)).reshape(
                    (t.shape[0],) + (1,) * (len(t.shape) - 1)) for j, t in enumerate(self.inputs)]
                try:
                    outs = self.fn(provs)
                    metas = self.infer()
                except (ValueError, RuntimeError):
                    outs = None
                if outs is not None and all(
                        o.dtype == torch.int64 and o.dim() == len(m.shape) and m.shape and o.shape[0] == m.shape[0]
                        and o.numel() == m.shape[0] for o, m in zip(outs, metas)):
                    self._maps = [o.reshape(-1) for o in outs]
        return self._maps[index] if self._maps else None

    def gather(self, codes: torch.Tensor, shape, dtype) -> torch.Tensor:
        """Rows named by provenance ``codes``, each source read as one span of rows."""
        import torch
        src = codes >> _SRC_SHIFT
        rows = codes & ((1 << _SRC_SHIFT) - 1)
        sources = torch.unique(src).tolist()
        if len(sources) == 1:  # one source (a permutation, a split): one span, one index_select
            t = self.inputs[sources[0]]
            lo, hi = int(rows.min()), int(rows.max()) + 1
            if hi - lo <= 2 * len(rows) + 64:
                block = t.rows(lo, hi)
                if hi - lo == len(rows) and bool((rows[1:] > rows[:-1]).all()):
                    return block.reshape(shape)  # the rows in order: no copy
                return block.index_select(0, rows - lo).reshape(shape)
        out = torch.empty(shape, dtype=dtype)
        for j in sources:
            sel = (src == j).nonzero().reshape(-1)
            r = rows[sel]
            lo, hi = int(r.min()), int(r.max()) + 1
            t = self.inputs[j]
            if hi - lo <= 2 * len(r) + 64:
                out.index_copy_(0, sel, t.rows(lo, hi).index_select(0, r - lo))
                continue
            order = torch.argsort(r)  # scattered rows: read runs of consecutive rows
            rs, ss = r[order], sel[order]
            breaks = (torch.nonzero(rs[1:] != rs[:-1] + 1).reshape(-1) + 1).tolist()
            for a, b in zip([0] + breaks, breaks + [len(rs)]):
                out[ss[a:b]] = t.rows(int(rs[a]), int(rs[b - 1]) + 1)
        return out

    def tensors(self, names: Sequence[str]) -> list[DerivedTensor]:
        metas = self.infer()
        if len(metas) != len(names):
            raise ValueError(f"op produced {len(metas)} tensors for {len(names)} names")
        return [DerivedTensor(n, m.shape, m.dtype, self, i) for i, (n, m) in enumerate(zip(names, metas))]


@dataclass
class Checkpoint:
    """A checkpoint as read: lazy tensors plus whatever configuration came with it."""

    path: str
    format: str  # hf | meta | jetstream | megatron | safetensors | pickle
    tensors: dict[str, LazyTensor]
    config: dict = field(default_factory=dict)  # config.json / params.json / megatron args
    meta: dict = field(default_factory=dict)  # format specific facts (files, tp/pp, ...)

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    def __getitem__(self, k: str) -> LazyTensor:
        return self.tensors[k]

    def __contains__(self, k: str) -> bool:
        return k in self.tensors

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def num_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


class RowSlice(LazyTensor):
    """Rows [start, stop) of another lazy tensor."""

    def __init__(self, name: str, base: LazyTensor, start: int, stop: int):
        super().__init__(name, (stop - start,) + base.shape[1:], base.dtype, base.origin)
        self.base, self.start, self.stop = base, start, stop

    def load(self) -> torch.Tensor:
        return self.base.rows(self.start, self.stop)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.base.rows(self.start + start, self.start + stop)
