"""Conversion tables: rows of (source keys, target keys, reversible op).

Keys may hold ``{i}`` for the layer index. ``invert`` reverses every row, so
a converter's inverse is derived, never written twice. ``apply`` turns a
mapping of lazy tensors into the lazy target tensors, layer by layer; nothing
is computed until a writer asks for the data.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import torch

from ckdiff.errors import InputError
from ckdiff.tensor.lazy import DerivedGroup, LazyTensor, OutputCache
from ckdiff.tensor.ops import Identity, Op


@dataclass(frozen=True)
class Rule:
    src: tuple
    dst: tuple
    op: Op = field(default_factory=Identity)
    layers: Optional[tuple] = None  # a layered rule's layers, where not every layer has its tensors

    def inverse(self) -> "Rule":
        return Rule(self.dst, self.src, self.op.reverse(), self.layers)

    @property
    def layered(self) -> bool:
        return any("{i}" in k for k in self.src + self.dst)


def R(src, dst, op: Op | None = None, layers=None) -> Rule:
    """Shorthand: ``R("a.{i}.w", "b.{i}.w", PermuteRope(...))``; lists for many keys. ``layers``: the layers
    a layered rule applies to (an MoE model's dense first layers have other tensors), every layer when None."""
    as_t = lambda x: (x,) if isinstance(x, str) else tuple(x)  # noqa: E731
    return Rule(as_t(src), as_t(dst), op or Identity(), None if layers is None else tuple(layers))


def invert(rules: Sequence) -> list:
    """The reverse table: each row reversed (and, for rows applied in sequence, in reverse order
    where the order matters: rename rows)."""
    if rules and all(isinstance(r, (Rename, LayerOffset)) for r in rules):
        return [r.inverse() for r in reversed(rules)]
    return [r.inverse() for r in rules]


@dataclass(frozen=True)
class Rename:
    """A key rename row: every occurrence of ``src`` in a key becomes ``dst`` (``{i}`` = a layer number).

    For names that differ between versions of one format (Megatron-LLM's legacy ``transformer`` /
    ``attention`` keys): a table of these maps one way, ``invert`` of it the other."""
    src: str
    dst: str

    def inverse(self) -> "Rename":
        return Rename(self.dst, self.src)

    def pattern(self) -> "re.Pattern":
        return re.compile(re.escape(self.src).replace(re.escape("{i}"), r"(?P<i>\d+)"))

    def __call__(self, key: str) -> str:
        return self.pattern().sub(lambda m: self.dst.format(i=m.groupdict().get("i")), key)


@dataclass(frozen=True)
class LayerOffset:
    """A key rename row: layer number ``i`` becomes ``i + offset`` (pipeline stages number their layers
    from 0; the global view from the stage's first layer)."""
    offset: int

    def inverse(self) -> "LayerOffset":
        return LayerOffset(-self.offset)

    def __call__(self, key: str) -> str:
        return re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + self.offset}.", key)


def rename(key: str, rows: Sequence) -> str:
    """``key`` passed through every row in order."""
    for r in rows:
        key = r(key)
    return key


class Renamed(LazyTensor):
    """The same data under another name (identity rows stay zero-copy)."""

    def __init__(self, name: str, base: LazyTensor):
        super().__init__(name, base.shape, base.dtype, base.origin)
        self.base = base

    def load(self):
        return self.base.load()

    def rows(self, start, stop):
        return self.base.rows(start, stop)


@dataclass
class Plan:
    """The rows a conversion used, for reports ("mapping table")."""
    rows: list = field(default_factory=list)  # [src keys, dst keys, op description]


def apply(tensors: Mapping[str, LazyTensor], rules: Sequence[Rule], layers: int,
          drop: Iterable[str] = (), where: str = "input", plan: Plan | None = None,
          cover: list | None = None, cache: OutputCache | None = None,
          absent: dict | None = None) -> dict[str, LazyTensor]:
    """Lazy targets of ``rules`` over ``tensors``; every source key must be used or dropped.

    The groups of this pass keep their computed outputs in ``cache`` (a fresh ``OutputCache`` of this
    pass when none is given).

    With ``cover`` (a list), one record of this pass is appended: how many times each source key was
    consumed by a rule, which were dropped by which named pattern, and which were set aside (below)
    (compare/coverage.py checks them).

    Without ``absent`` a rule whose source is missing is an error. With it (a dict: the names known to be
    absent from ``tensors``, each -> the tensors whose absence it stems from, e.g. an earlier pass's
    targets), such a rule is skipped: its targets are left out, its present sources are set aside, and on
    return ``absent`` holds this pass's skipped targets instead (each -> the missing tensors at the start
    of the chain), so a comparison can name what is missing. Tensors no rule consumes are an error either
    way (another model, not a missing tensor)."""
    drop_re = [re.compile(p) for p in drop]
    cache = cache if cache is not None else OutputCache()
    out: dict[str, LazyTensor] = {}
    used: set = set()
    uses: dict = {}
    planned: set = set()
    known = dict(absent or {})  # names absent from ``tensors`` -> their missing origins
    gone: dict = {}  # targets left out -> missing origins
    aside: dict = {}  # present sources of a skipped rule -> why they are set aside
    head = [r for r in rules if not r.layered]
    first_layered = next((i for i, r in enumerate(rules) if r.layered), len(rules))
    pre = [r for r in rules[:first_layered] if not r.layered]
    post = [r for r in head if r not in pre]
    layered = [r for r in rules if r.layered]

    def run(rule: Rule, i):
        src = [k.format(i=i) for k in rule.src]
        dst = [k.format(i=i) for k in rule.dst]
        missing = [k for k in src if k not in tensors]
        if missing and absent is None:
            raise InputError(where, f"missing tensor {missing[0]!r} (needed for {dst[0]!r})")
        if missing:
            origins = list(dict.fromkeys(o for k in missing for o in known.get(k, [k])))
            for d in dst:
                gone[d] = origins
            for k in src:
                if k in tensors:
                    aside[k] = f"set aside: input of {dst[0]}, which cannot be built without the missing {', '.join(origins)}"
            return
        used.update(src)
        if cover is not None:
            for k in src:
                uses[k] = uses.get(k, 0) + 1
        if isinstance(rule.op, Identity):
            for s, d in zip(src, dst):
                out[d] = Renamed(d, tensors[s])
        else:
            group = DerivedGroup([tensors[k] for k in src], rule.op, cache=cache)
            try:
                targets = group.tensors(dst)
            except (ValueError, RuntimeError) as e:
                raise InputError(where, f"cannot map {src} -> {dst}: {e}") from None
            for t in targets:
                out[t.name] = t
        if plan is not None and id(rule) not in planned:  # each rule once, where it first applies
            planned.add(id(rule))
            plan.rows.append([list(rule.src), list(rule.dst), rule.op.describe()])

    for r in pre:
        run(r, None)
    for i in range(layers):
        for r in layered:
            if r.layers is None or i in r.layers:
                run(r, i)
    for r in post:
        run(r, None)
    unused = [k for k in tensors if k not in used and k not in aside and not any(p.search(k) for p in drop_re)]
    if cover is not None:
        cover.append({"sources": list(tensors), "uses": uses, "dropped": {
            k: next(p.pattern for p in drop_re if p.search(k)) for k in tensors
            if k not in used and any(p.search(k) for p in drop_re)},
            "set_aside": {k: why for k, why in aside.items() if k not in used}})
    if absent is not None:
        absent.clear()
        absent.update(gone)
    if unused:
        more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
        raise UnmappedError(where, f"unmapped tensors {unused[:3]}{more}: the converter does not know them", unused)
    return out


class UnmappedError(InputError):
    """Source tensors that no rule of a table consumes (``names``)."""

    def __init__(self, path, problem, names):
        super().__init__(path, problem)
        self.names = list(names)


def apply_present(tensors: Mapping[str, LazyTensor], rules: Sequence[Rule], where: str = "input",
                  cache: OutputCache | None = None) -> dict[str, LazyTensor]:
    """``tensors`` with the rows of ``rules`` (no ``{i}``) applied where all their sources are present;
    other tensors pass through unchanged, in their order (a target replaces its source in place)."""
    cache = cache if cache is not None else OutputCache()
    out = dict(tensors)
    for rule in rules:
        if not all(k in out for k in rule.src):
            continue
        group = DerivedGroup([out[k] for k in rule.src], rule.op, cache=cache)
        try:
            targets = group.tensors(list(rule.dst))
        except (ValueError, RuntimeError) as e:
            raise InputError(where, f"cannot map {list(rule.src)} -> {list(rule.dst)}: {e}") from None
        for k in rule.src:
            if k not in rule.dst:
                del out[k]
        for t in targets:
            out[t.name] = t
    return out


def check_tie(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape or not torch.equal(a, b):
        raise ValueError(f"{what}: tied tensors differ; the checkpoint is not tied")


class Tie(Op):
    """One tensor -> the same tensor twice (embedding reused as the output layer)."""
    n_in, n_out = 1, 2
    rowwise = True

    def __call__(self, xs):
        return [xs[0], xs[0]]

    def reverse(self):
        return Untie()

    def describe(self):
        return "tied: copy embedding to output"

    def __eq__(self, o):
        return isinstance(o, Tie)

    def __hash__(self):
        return 1


class Untie(Op):
    """Two tensors that must be equal -> one (verifies the tie rather than assuming it)."""
    n_in, n_out = 2, 1

    def __call__(self, xs):
        if xs[0].device.type != "meta":
            check_tie(xs[0], xs[1], "untie")
        return [xs[0]]

    def reverse(self):
        return Tie()

    def describe(self):
        return "tied: output must equal embedding, kept once"

    def __eq__(self, o):
        return isinstance(o, Untie)

    def __hash__(self):
        return 2
