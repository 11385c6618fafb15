"""Lint one checkpoint: what ``ckdiff check X`` reports, a finding per problem that holds in X alone.

- config: the config read and range-checked, and checked against the tensor shapes (models/config.py);
  its findings against the tensors (tie flag vs head, vocab vs embedding rows, head counts vs rows);
- coverage: every tensor is consumed by the layout's table into canonical HF, or dropped by a named
  rule of the layout (a tensor the family does not declare is a finding), and every tensor the table
  needs is there (each missing one a finding, as is one the reader left out for lack of a shard);
- values: NaN and Inf per tensor, streamed row block by row block;
- dtypes: weight matrices of more than one floating dtype (a partial cast); norms and vectors kept in
  a wider dtype, scales, FP8 and integer codes are not counted;
- padding: embedding rows beyond the config's vocab (a config_findings kind), and Megatron padding its
  config declares (a note).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from ckdiff.formats.readers import dtype_name
from ckdiff.tensor.lazy import CHUNK_BYTES, Checkpoint


@dataclass
class LintFinding:
    check: str  # config | coverage | values | dtypes | padding | tied
    text: str


@dataclass
class LintResult:
    path: str
    format: str
    tensors: int
    findings: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    checks: list = field(default_factory=list)  # the checks that ran

    @property
    def equivalent(self) -> bool:
        """No finding (the name every result type shares with the reports)."""
        return not self.findings

    def verdict(self) -> str:
        return "clean" if self.equivalent else "findings"

    def to_dict(self) -> dict:
        return {"verdict": self.verdict(), "path": self.path, "format": self.format, "tensors": self.tensors,
                "checks": self.checks, "findings": [asdict(f) for f in self.findings], "notes": self.notes}


_KIND_CHECK = {"untied-without-head": "tied", "tied-head-differs": "tied", "vocab-over-rows": "padding",
               "rows-over-vocab": "padding"}


def _config(ck: Checkpoint, res: LintResult):
    """The ModelConfig (None when the format has none or it does not hold) and the config findings."""
    from ckdiff.formats import registry
    from ckdiff.models.config import ConfigError, canonical_config, config_findings, config_where
    from ckdiff.errors import InputError
    f = registry.lookup(ck.format)
    if f is None or f.config is None or not ck.config:
        res.notes.append(f"{ck.format}: no model config; the config and coverage checks do not apply")
        return None
    res.checks += ["config", "tied", "coverage"]
    cfg = None
    try:
        cfg = registry.model_config(ck)
    except (ConfigError, InputError) as e:
        res.findings.append(LintFinding("config", str(e.problem if isinstance(e, InputError) else e)))
    try:
        canon = canonical_config(ck.format, ck.config, ck.tensors, config_where(ck))
    except (ConfigError, TypeError, ValueError, KeyError, ZeroDivisionError):
        canon = None  # already a finding above
    for x in config_findings(ck.format, ck.config, ck.tensors, canon):
        res.findings.append(LintFinding(_KIND_CHECK.get(x.kind[0], "config"), str(x)))
    if f.true_vocab is not None:
        true = f.true_vocab(ck.config or {})
        if isinstance(true, int):
            res.notes.append(f"vocab padding declared by the config: rows from {true} on are padding")
    return cfg


def _coverage(ck: Checkpoint, cfg, res: LintResult) -> None:
    from ckdiff.formats import registry
    from ckdiff.formats.layouts import convert_formats
    from ckdiff.errors import InputError
    f = registry.lookup(ck.format)
    if cfg is None or f is None or (f.layout is None and f.table is None):
        return
    cover: list = []
    absent: dict = {}  # every missing tensor a finding, not only the first
    try:
        convert_formats(ck.tensors, f, registry.get("hf"), cfg, ck.path, cover=cover, absent=absent)
    except InputError as e:
        res.findings.append(LintFinding("coverage", str(e.problem)))
        return
    left_out = (ck.meta or {}).get("incomplete", {})  # found by _incomplete
    by: dict = {}
    for target, origins in absent.items():
        for o in origins:
            by.setdefault(o, []).append(target)
    for o, targets in by.items():
        if o not in left_out:  # the targets it feeds, unless it is its own (an HF source)
            feeds = [t for t in sorted(targets) if t != o]
            res.findings.append(LintFinding("coverage", f"missing tensor {o!r}"
                                            + (f" (needed for {', '.join(feeds)})" if feeds else "")))


def _incomplete(ck: Checkpoint, res: LintResult) -> None:
    """Tensors the reader left out for lack of a shard (a Megatron-LLM TP rank file without one)."""
    from pathlib import Path
    for f, problem in (ck.meta or {}).get("incomplete", {}).values():
        if "coverage" not in res.checks:
            res.checks.append("coverage")
        res.findings.append(LintFinding("coverage", f"{Path(f).parent.name}/{Path(f).name} {problem}"))


def _values(ck: Checkpoint, res: LintResult, chunk_bytes: int, progress=None) -> None:
    res.checks.append("values")
    for name, t in ck.tensors.items():
        if not t.dtype.is_floating_point:
            continue
        nan = inf = 0
        for lo, hi in t.row_chunks(chunk_bytes):
            x = t.rows(lo, hi)
            if x.dtype.itemsize == 1:  # fp8: no isnan kernel on every torch; upcast the block
                x = x.float()
            nan += int(torch.isnan(x).sum())
            inf += int(torch.isinf(x).sum())
            if progress:
                progress((hi - lo) * t.row_read_bytes)
        if nan or inf:
            res.findings.append(LintFinding("values", f"{name}: {nan} NaN, {inf} Inf of {t.numel} elements"))


def _is_scale(name: str) -> bool:
    return name.endswith(("scale", "scale_inv", "_scale_inv", "weight_scale", "input_scale"))


def _dtypes(ck: Checkpoint, res: LintResult) -> None:
    res.checks.append("dtypes")
    mats: dict = {}
    for name, t in ck.tensors.items():
        if t.dtype.is_floating_point and t.dtype.itemsize > 1 and len(t.shape) >= 2 and not _is_scale(name):
            mats.setdefault(dtype_name(t.dtype), []).append(name)
    if len(mats) > 1:
        parts = [f"{len(v)} {d} (e.g. {v[0]})" for d, v in sorted(mats.items(), key=lambda kv: -len(kv[1]))]
        res.findings.append(LintFinding("dtypes", "weight matrices of mixed dtypes: " + ", ".join(parts)
                                        + " (a partial cast?)"))


def lint(ck: Checkpoint, chunk_bytes: int = CHUNK_BYTES, progress_factory=None) -> LintResult:
    """Every check on one checkpoint; a finding per problem, never an exception for a finding."""
    res = LintResult(ck.path, ck.format, len(ck.tensors))
    cfg = _config(ck, res)
    _incomplete(ck, res)
    _coverage(ck, cfg, res)
    _dtypes(ck, res)
    total = sum(t.nbytes for t in ck.tensors.values() if t.dtype.is_floating_point)
    progress = progress_factory(total) if progress_factory else None
    _values(ck, res, chunk_bytes, progress)
    if progress is not None and hasattr(progress, "stop"):
        progress.stop()
    return res


__all__ = ["lint", "LintResult", "LintFinding"]
