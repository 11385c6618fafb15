"""The format registry: every checkpoint format is declared once, as one :class:`Format`.

A declaration says how to recognise the format (``detect``, tried in ``priority`` order among the
formats of the same ``input`` kind), how to read it (``read``), where its model config comes from
(``config_file``, ``config``: raw config -> ModelConfig, ``canonical``: raw config -> the canonical
dict compared across layouts), which key table it follows (``layout``: the name ``layouts.hf_to`` and
``layouts.convert`` take, or the format's own ``table`` of rows from canonical HF; None for a plain set
of tensors), which formats share its tensor names (``names``), the tensors that carry no weights
(``drop``), the vocab padding its config declares (``true_vocab``), how the logit check runs it
(``runtime``) and how a layer index appears in its tensor names (``layer``). The CLI's ``--format`` choices and help, detection, alignment, coverage, the
commands' checks and the reports' per-layer views are derived from these declarations.

The built-in formats register in their own modules (listed in ``BUILTIN``, imported on the first
lookup); a new format is one ``register(Format(...))`` call, undone by ``unregister(name)``.
Encodings (codes with block scales: FP8, JetStream int8/int4; ``tensor/blockscaled.py``) register
through ``register_encoding``: ``open_checkpoint`` applies every one to what a reader returns, so the
rest of ckdiff sees logical tensors only.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Optional


class Input(Enum):
    """What detection looks at: a directory or a single file."""
    DIR = "directory"
    FILE = "file"


class Runtime(Enum):
    """How ``ckdiff logits`` runs a checkpoint of the format."""
    NONE = "none"        # a plain set of tensors: no model to run
    NATIVE = "native"    # a reference runtime written against the format's own layout
    VIA_HF = "via-hf"    # mapped lazily into the HF layout through its table, then the HF runtime


# a layer index in a tensor name: ``layers.3.``, ``h.3.``, ``blk.3.`` (group 1 is the index)
GENERIC_LAYER = r"(?:^|\.)(?:layers|h|blk)\.(\d+)\."


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    detect: Callable[[Path], bool]
    read: Callable[..., object]  # (path, trust_pickle=False) -> Checkpoint
    priority: int  # detection order among formats of the same input kind: lower is tried first
    input: Input = Input.DIR
    layout: Optional[str] = None  # key table (``layouts.hf_to(layout, cfg)``); None: compared by name only
    names: Optional[str] = None  # formats with the same names need no mapping (default: the layout)
    config_file: Optional[str] = None  # the config's file in the checkpoint ("." itself); None: its first file
    config: Optional[Callable] = None  # (raw config, tensors, where) -> ModelConfig
    canonical: Optional[Callable] = None  # (raw config, tensors) -> canonical config dict
    drop: tuple = ()  # regexes of tensors that carry no weights in this layout
    true_vocab: Optional[Callable[[dict], Optional[int]]] = None  # rows past it are padding the config declares
    runtime: Runtime = Runtime.NONE
    layer: str = GENERIC_LAYER  # regex; group 1 is the layer index, the rest of the name follows the match
    table: Optional[Callable] = None  # cfg -> rows from canonical HF, for a layout ``layouts.hf_to`` does not know
    mapped_into: bool = False  # compared across layouts, the other side is always mapped into this one (its
    #                            table holds ops that are exact only in the converter's direction, e.g. 1 + w)

    @property
    def key_names(self) -> Optional[str]:
        return self.names or self.layout

    @property
    def layer_re(self) -> re.Pattern:
        return _compiled(self.layer)

    def where(self, ck) -> str:
        """The file the checkpoint's config comes from, for messages."""
        if self.config_file:
            return str(Path(ck.path) / self.config_file)
        files = (ck.meta or {}).get("files") or [ck.path]
        return str(sorted(files)[0])


@dataclass(frozen=True)
class Encoding:
    """Stored codes and scales read as logical block-scaled views (``tensor/blockscaled.py``):
    ``view(ck) -> ck'`` replaces each stored group by one view, and returns ``ck`` itself when the
    encoding does not occur."""
    name: str
    description: str
    view: Callable


_COMPILED: dict = {}


def _compiled(pattern: str) -> re.Pattern:
    if pattern not in _COMPILED:
        _COMPILED[pattern] = re.compile(pattern)
    return _COMPILED[pattern]


# the modules that declare the built-in formats, in the order the CLI lists them
BUILTIN = ("readers", "megatron_llm", "mcore", "dcp", "gguf", "fp8", "jetstream_quant", "compressed_tensors",
           "mxfp4", "modelopt", "mlx")


@dataclass
class _Registry:
    formats: dict = field(default_factory=dict)
    encodings: dict = field(default_factory=dict)
    loaded: bool = False
    loading: bool = False


_REG = _Registry()


def _load() -> None:
    if _REG.loaded or _REG.loading:
        return
    _REG.loading = True
    try:
        for m in BUILTIN:
            importlib.import_module(f".{m}", __package__)
        _REG.loaded = True
    finally:
        _REG.loading = False


def loaded() -> bool:
    """Whether the built-in formats' modules have been imported (they import torch)."""
    return _REG.loaded


def register(f: Format) -> Format:
    """Add a format. Its name and its (input, priority) must be new: detection order is never ambiguous."""
    if f.name in _REG.formats:
        raise ValueError(f"format {f.name!r} is already registered")
    if "->" in f.name or not f.name:
        raise ValueError(f"format name {f.name!r}: must be non-empty and hold no '->'")
    clash = [g.name for g in _REG.formats.values() if g.input is f.input and g.priority == f.priority]
    if clash:
        raise ValueError(f"format {f.name!r}: detection priority {f.priority} is taken by {clash[0]!r}")
    _REG.formats[f.name] = f
    return f


def unregister(name: str) -> None:
    _REG.formats.pop(name, None)


def register_encoding(e: Encoding) -> Encoding:
    _REG.encodings[e.name] = e
    return e


def _module_rank(f: Format) -> int:
    """Built-in formats in the order of ``BUILTIN`` whatever was imported first; others after, as registered."""
    mod = getattr(f.read, "__module__", "") or ""
    short = mod.rsplit(".", 1)[-1]
    return BUILTIN.index(short) if mod.startswith(__package__ + ".") and short in BUILTIN else len(BUILTIN)


def formats() -> list[Format]:
    _load()
    return sorted(_REG.formats.values(), key=_module_rank)


def names() -> list[str]:
    return [f.name for f in formats()]


def declared() -> list[tuple[str, str]]:
    """(name, description) of every format, for help texts: the registry's once it is loaded, else the
    built-in declarations read from their modules' source without importing them (importing them
    imports torch, which ``ckdiff --help`` does not need). A declaration whose name or description is
    not a literal loads the registry instead."""
    if _REG.loaded:
        return [(f.name, f.description) for f in formats()]
    import ast
    out = []
    for m in BUILTIN:
        src = Path(__file__).with_name(f"{m}.py").read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(src)):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register" and node.args
                    and isinstance(node.args[0], ast.Call) and getattr(node.args[0].func, "id", None) == "Format"):
                continue
            call = node.args[0]
            fields = dict(zip(("name", "description"), call.args))
            fields.update({k.arg: k.value for k in call.keywords if k.arg in ("name", "description")})
            lit = [fields.get(k) for k in ("name", "description")]
            if not all(isinstance(x, ast.Constant) and isinstance(x.value, str) for x in lit):
                return [(f.name, f.description) for f in formats()]
            out.append((lit[0].value, lit[1].value))
    return out


def encodings() -> list[Encoding]:
    """Registered encodings by name (each applies to its own stored groups, so the order is only for listing)."""
    _load()
    return sorted(_REG.encodings.values(), key=lambda e: e.name)


def apply_encodings(ck):
    """A checkpoint as read, with every registered encoding's stored groups replaced by logical views."""
    for e in encodings():
        ck = e.view(ck)
    return ck


def get(name: str) -> Format:
    """The format named ``name`` (KeyError otherwise)."""
    _load()
    return _REG.formats[name]


def lookup(name: Optional[str], side: str = "source") -> Optional[Format]:
    """The format of a checkpoint's ``format`` string, None when unknown. A mapped checkpoint's format
    reads ``source->target``: ``side`` picks which one (the source's config, the target's names)."""
    if not name:
        return None
    parts = name.split("->")
    _load()
    return _REG.formats.get(parts[0] if side == "source" else parts[-1])


def detection_order(kind: Input) -> list[Format]:
    return sorted((f for f in formats() if f.input is kind), key=lambda f: f.priority)


def detect(p: Path, kind: Input) -> Optional[Format]:
    """The first format of ``kind``, in priority order, whose ``detect`` accepts ``p``."""
    for f in detection_order(kind):
        if f.detect(p):
            return f
    return None


def layer_patterns(*format_names: Optional[str]) -> list[re.Pattern]:
    """The layer regexes of the target layouts of ``format_names`` (a mapped side's names are its
    target's), the generic one last."""
    out = []
    for n in format_names:
        f = lookup(n, "target")
        if f is not None and f.layer_re not in out:
            out.append(f.layer_re)
    g = _compiled(GENERIC_LAYER)
    return out + ([g] if g not in out else [])


def drop_patterns(fmt_name: Optional[str]) -> list[re.Pattern]:
    """Compiled ``drop`` regexes of the layout a checkpoint's names follow."""
    f = lookup(fmt_name, "target")
    return [_compiled(p) for p in (f.drop if f is not None else ())]




def model_config(ck):
    """The canonical ModelConfig of a checkpoint from its own config (the format's ``config`` reader)."""
    from ckdiff.errors import InputError
    f = lookup(ck.format)
    if f is None or f.config is None or "->" in (ck.format or ""):
        raise InputError(ck.path, f"a {ck.format} input has no architecture config; use a model directory")
    return f.config(ck.config, ck.tensors, f.where(ck))


__all__ = ["Format", "Input", "Runtime", "Encoding", "register", "unregister", "register_encoding", "formats",
           "names", "declared", "encodings", "apply_encodings", "get", "lookup", "detect", "detection_order",
           "layer_patterns", "drop_patterns",
           "model_config", "GENERIC_LAYER"]
