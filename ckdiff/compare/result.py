"""The result types of a comparison (one ``TensorResult`` per tensor, the ``CompareResult``), its options and
the default tolerances per dtype pair."""
from __future__ import annotations


import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from ckdiff.compare.status import Status, rank
from ckdiff.tensor.dtype_names import dtype_name

# rtol, atol per dtype, by name (torch.testing's _DTYPE_PRECISIONS, fp32/fp64 from its defaults); no torch
# import here: the identical-pair check (compare/quick.py) builds these results before torch is loaded
DTYPE_TOL = {
    "float16": (1e-3, 1e-5), "bfloat16": (1.6e-2, 1e-5), "float32": (1.3e-6, 1e-5),
    "float64": (1e-7, 1e-7), "float8_e4m3fn": (1.25e-1, 1e-3), "float8_e5m2": (2.5e-1, 1e-3),
}


PRECISION_ORDER = ["float8_e5m2", "float8_e4m3fn", "bfloat16", "float16", "float32", "float64"]


@dataclass
class Tolerance:
    atol: float
    rtol: float
    source: str  # "exact" | "dtype <name>" | "--atol/--rtol" | "pattern <p>"


@dataclass(slots=True)  # one per tensor, and a checkpoint can hold 10^6 of them: no per-instance dict
class TensorResult:
    name: str
    status: Status  # compare/status.py: equal, close, cast, quant, reordered, dtype, differ, shape, only-a, only-b
    shape_a: Optional[tuple] = None  # the lazy tensors' own shape tuples (shared, not copied); lists in to_dict
    shape_b: Optional[tuple] = None
    dtype_a: Optional[str] = None
    dtype_b: Optional[str] = None
    bit_exact: Optional[bool] = None
    numel: int = 0
    max_abs: float = 0.0
    max_abs_index: Optional[list] = None
    mean_abs: float = 0.0
    max_rel: float = 0.0
    cosine: Optional[float] = None
    norm_a: Optional[float] = None  # L2 norms of the finite elements (with cosine: the diagnosis's L2 bounds)
    norm_b: Optional[float] = None
    n_over_tol: int = 0
    nan_a: int = 0
    nan_b: int = 0
    inf_a: int = 0
    inf_b: int = 0
    atol: Optional[float] = None
    rtol: Optional[float] = None
    tol_source: Optional[str] = None
    # () until the diagnosis assigns a list: an equal tensor (most of 10^6) allocates none
    diagnosis: Sequence = ()  # texts, rendered from ``findings`` where those are typed
    findings: Sequence = ()  # typed findings ({"kind", **params}, compare/findings.py)
    note: Optional[str] = None

    @property
    def ok(self) -> bool:
        return Status(self.status).ok

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("shape_a", "shape_b", "diagnosis", "findings"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d


@dataclass
class CompareResult:
    a: str
    b: str
    format_a: str
    format_b: str
    tensors: list[TensorResult]
    # [field, value_a, value_b]: function-changing differences of the canonical configs
    config_diff: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    mapping: list = field(default_factory=list)  # [source keys, target keys, op] when a converter was involved
    config_findings: list = field(default_factory=list)  # "A: ..." config disagrees with its own tensors
    # per side: tensors read, consumed by rules, dropped (name -> named rule), unaccounted (compare/coverage.py)
    coverage: dict = field(default_factory=dict)
    # findings about both checkpoints alike ("A and B: ..."): not a difference between them; fail with strict
    warnings: list = field(default_factory=list)
    strict: bool = False

    @property
    def equivalent(self) -> bool:
        """Equivalent only when every tensor is, and the configs define the same function and fit
        their tensors (fields that do not change the function never count). A finding shared by both
        sides is a warning: it fails only with ``strict``."""
        return all(t.ok for t in self.tensors) and not self.config_diff and not self.config_findings \
            and not any(c.get("unaccounted") for c in self.coverage.values()) \
            and not (self.strict and self.warnings)

    def counts(self) -> dict:
        c: dict = {}
        for t in self.tensors:
            c[t.status] = c.get(t.status, 0) + 1
        return c

    def counts_text(self) -> str:
        """The counts in words, worst status first: ``1 differ, 20 equal``."""
        return counts_text(self.counts())

    def reasons(self) -> list[str]:
        """Why the pair is not equivalent beyond its tensors (see :func:`reasons`)."""
        return reasons({"config_diff": self.config_diff, "config_findings": self.config_findings,
                        "coverage": self.coverage})

    def verdict(self) -> str:
        return "equivalent" if self.equivalent else "differ"

    def worst_first(self) -> list[TensorResult]:
        return sorted(self.tensors, key=lambda t: (rank(t.status), -(t.n_over_tol or 0),
                                                   -(t.max_abs or 0.0), t.name))

    def to_dict(self, tensors: bool = True) -> dict:
        """The JSON-ready result; ``tensors=False`` leaves the per-tensor rows out (``tensor_dicts`` streams
        them: 10^6 rows as one list of dicts would take gigabytes)."""
        return {
            "verdict": self.verdict(), "a": self.a, "b": self.b,
            "format_a": self.format_a, "format_b": self.format_b,
            "counts": self.counts(), "options": self.options, "notes": self.notes,
            "config_diff": self.config_diff, "config_findings": self.config_findings, "warnings": self.warnings,
            "strict": self.strict, "mapping": self.mapping,
            "coverage": self.coverage, **({"tensors": list(self.tensor_dicts())} if tensors else {}),
        }

    def tensor_dicts(self):
        return (t.to_dict() for t in self.tensors)


def counts_text(counts: dict) -> str:
    """{status: n} in words, worst status first: ``1 differ, 20 equal``."""
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: (rank(kv[0]), str(kv[0]))))


def reasons(d: dict) -> list[str]:
    """The failures of a comparison that are not a tensor's, one line each, from a result or its
    to_dict(): function-changing config differences, config findings, tensors no rule accounts for."""
    from ckdiff.compare.coverage import unaccounted_note
    out = [f"config {k}: A={a!r} B={b!r}" for k, a, b in d.get("config_diff") or []]
    out += [str(f) for f in d.get("config_findings") or []]
    return out + unaccounted_note(d.get("coverage") or {})


def default_tolerance(da, db) -> Tolerance:
    """The tolerance of a pair of dtypes (torch dtypes or their names): exact for one dtype, else the
    looser of the two floating dtypes'."""
    if da == db:
        return Tolerance(0.0, 0.0, "exact")
    floats = [n for n in (dtype_name(da), dtype_name(db)) if n in DTYPE_TOL]
    if not floats:
        return Tolerance(0.0, 0.0, "exact")
    low = min(floats, key=PRECISION_ORDER.index)
    rtol, atol = DTYPE_TOL[low]
    return Tolerance(atol, rtol, f"dtype {low}")


@dataclass
class Options:
    atol: Optional[float] = None
    rtol: Optional[float] = None
    patterns: list = field(default_factory=list)  # [(glob, atol, rtol, reason)]
    only: list = field(default_factory=list)
    ignore: list = field(default_factory=list)
    diagnose: bool = True
    strict_dtype: bool = False
    strict: bool = False  # warnings (findings that hold on both sides) fail the comparison
    # per side: the window mapped of a file-backed side (32 MiB: a quarter as many unmaps, each of which
    # interrupts the kernel's threads, as 8 MiB); rows gathered through a table go a sixteenth of it at a
    # time, block-scaled rows a quarter
    chunk_bytes: int = 32 * 1024 * 1024
    # None: the numba kernels (compare/kernels.py); a torch device name ("cuda", "cpu"): the same metrics
    # as torch operations on that device (compare/kernels_torch.py)
    device: Optional[str] = None

    def tolerance(self, name: str, da, db) -> Tolerance:
        for pat, atol, rtol, reason in self.patterns:
            if fnmatch.fnmatchcase(name, pat):
                return Tolerance(atol, rtol if rtol is not None else 0.0,
                                 f"pattern {pat}" + (f" ({reason})" if reason else ""))
        if self.atol is not None or self.rtol is not None:
            return Tolerance(self.atol or 0.0, self.rtol or 0.0, "--atol/--rtol")
        return default_tolerance(da, db)

    def selected(self, name: str) -> bool:
        if self.only and not any(fnmatch.fnmatchcase(name, p) for p in self.only):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.ignore)
