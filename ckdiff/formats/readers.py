"""Readers of the plain formats (single files, HF, plain tensor directories, Meta, JetStream-pt), their
declarations, and the entry points: ``detect_format`` and ``open_checkpoint``.

Every format is one ``registry.Format`` declared next to its reader (here, or in its own module:
megatron_llm.py, mcore.py, dcp.py, gguf.py, ...); detection and ``--format`` come from the registry.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path


from ckdiff.errors import InputError, UsageError
from ckdiff.tensor.lazy import Checkpoint, DerivedGroup, LazyTensor
from ckdiff.tensor.ops import Shard, ShardRow, ShardSplit, ShardTable
from ckdiff.io.inputs import kind_of, stat_input
from ckdiff.io.weight_files import _hf_weight_files, _json, _merge_files, _read_indexed
from ckdiff.io.pickles import read_pickle_tensors
from ckdiff.io.safetensors import read_safetensors
from ckdiff.tensor.dtype_names import dtype_name  # noqa: F401 - re-exported: readers name dtypes
from ckdiff.formats import registry
from ckdiff.formats.registry import Format, Input, Runtime

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _read_single(path: Path, trust_pickle: bool = False) -> dict[str, LazyTensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_pickle_tensors(path, trust_pickle)


# ---------------------------------------------------------------- single files
def is_tensor_file(p: Path) -> bool:
    return p.is_file() and (p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES)


def read_file(p: Path, trust_pickle=False, **_) -> Checkpoint:
    return Checkpoint(str(p), "file", _read_single(p, trust_pickle), meta={"files": [str(p)]})


# ---------------------------------------------------------------- HF directories
def is_hf_dir(p: Path) -> bool:
    return p.is_dir() and os.path.lexists(p / "config.json") and _hf_weight_files(p)[0] is not None


def _read_weight_files(p: Path, found: tuple, trust_pickle: bool, missing: str) -> tuple[dict, list]:
    """Tensors and file list of a directory's weight files as ``_hf_weight_files``/``_plain_weight_files``
    found them (an index, or a list of files merged by name)."""
    kind, what = found
    one = lambda f: _read_single(f, trust_pickle)  # noqa: E731
    if kind == "index":
        tensors = _read_indexed(p, what, one)
        return tensors, sorted({t.origin for t in tensors.values()})
    if kind == "files":
        return _merge_files(what, one, p), [str(f) for f in what]
    raise InputError(p, missing)


def read_hf(p: Path, trust_pickle=False, **_) -> Checkpoint:
    tensors, files = _read_weight_files(p, _hf_weight_files(p), trust_pickle,
                                        "HF directory without weights (no *.safetensors or pytorch_model*.bin)")
    config = _json(p / "config.json") if os.path.lexists(p / "config.json") else {}
    tensors, notes = fused_experts_view(tensors, config, p)
    return Checkpoint(str(p), "hf", tensors, config=config, meta={"files": files, "notes": notes})


_FUSED = re.compile(r"^(?P<pre>.*layers\.(?P<i>\d+)\.)mlp\.experts\.gate_up_proj$")


def fused_experts_view(tensors: dict, config: dict, where) -> tuple[dict, list]:
    """transformers 5's fused MoE layout (``save_pretrained(..., save_original_format=False)``):
    ``mlp.experts.gate_up_proj`` [E, 2F, D] (each expert's gate rows, then its up rows),
    ``mlp.experts.down_proj`` [E, D, F] and ``mlp.gate.weight``, read as the family's per-expert tensors
    (``experts.{e}.w1/w2/w3``, the router under its name) through a reversible table: the same model in
    either layout compares tensor for tensor. Anything else passes through."""
    from ckdiff.models import families
    from ckdiff.tensor.ops import Unstack, UnstackSplit
    from ckdiff.tensor.table import R, apply_present
    hits = [m for m in map(_FUSED.match, tensors) if m]
    fam = families.for_model_type(str((config or {}).get("model_type") or "")) if isinstance(config, dict) else None
    if not hits or fam is None or "expert" not in fam.hf_names or "router" not in fam.hf_names:
        return tensors, []
    rules = []
    for m in hits:
        i, pre = int(m["i"]), m["pre"]
        gu, down, router = tensors[m.group(0)], tensors.get(pre + "mlp.experts.down_proj"), tensors.get(pre + "mlp.gate.weight")
        if len(gu.shape) != 3 or gu.shape[1] % 2 or down is None or router is None:
            continue
        E, F = gu.shape[0], gu.shape[1] // 2
        w = lambda e, n: fam.hf_names["expert"].format(i=i, e=e, n=n)  # noqa: E731  (w1 gate, w2 down, w3 up)
        rules += [R(m.group(0), [w(e, n) for e in range(E) for n in (1, 3)], UnstackSplit(E, (F, F))),
                  R(pre + "mlp.experts.down_proj", [w(e, 2) for e in range(E)], Unstack(E)),
                  R(pre + "mlp.gate.weight", fam.hf_names["router"].format(i=i))]
    if not rules:
        return tensors, []
    return apply_present(tensors, rules, str(where)), [
        "transformers 5 fused expert layout (mlp.experts.gate_up_proj, down_proj) read as per-expert tensors"]


# ---------------------------------------------------------------- plain directories of tensor files
def _plain_weight_files(p: Path):
    """A directory's tensor files without a model config: an index, *.safetensors, or pickles."""
    for pattern in ("*.safetensors.index.json", "*.bin.index.json"):
        idx = sorted(p.glob(pattern))
        if len(idx) == 1:
            return "index", idx[0]
    st = sorted(f for f in p.glob("*.safetensors") if f.is_file())
    if st:
        return "files", st
    pk = sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
    return ("files", pk) if pk else (None, None)


def is_tensor_dir(p: Path) -> bool:
    return p.is_dir() and not (p / "config.json").is_file() and not (p / "params.json").is_file() \
        and _plain_weight_files(p)[0] is not None


def read_tensor_dir(p: Path, trust_pickle=False, **_) -> Checkpoint:
    tensors, files = _read_weight_files(p, _plain_weight_files(p), trust_pickle,
                                        "no tensor files (*.safetensors, *.bin, *.pt, *.pth)")
    return Checkpoint(str(p), "tensors", tensors, meta={"files": files})


# ---------------------------------------------------------------- Meta directories
META_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")
# How Meta's consolidated.NN.pth shards cut each tensor (transformers' convert_llama_weights_to_hf.py
# merges them on these axes): the writer splits
# with this table, the reader merges with its reverse. The embedding's cut depends on the Llama version.
META_SHARDS = ShardTable([
    ShardRow(r"^tok_embeddings\.weight$", {2: Shard.COLS, 3: Shard.ROWS}),  # hidden axis (1/2), vocab (3)
    ShardRow(r"attention\.w[qkv]\.weight$", Shard.ROWS), ShardRow(r"attention\.wo\.weight$", Shard.COLS),
    ShardRow(r"feed_forward\.w[13]\.weight$", Shard.ROWS), ShardRow(r"feed_forward\.w2\.weight$", Shard.COLS),
    ShardRow(r"^output\.weight$", Shard.ROWS),
    ShardRow(r"norm\.weight$", Shard.REPLICATED), ShardRow(r"^rope\.freqs$", Shard.REPLICATED),
])


def meta_variant(llama_version: int) -> int:
    """The ``META_SHARDS`` variant of a Llama version (1 and 2 cut alike)."""
    return 3 if llama_version >= 3 else 2


REPLICA_ATOL = 1e-2  # Llama-3-70B norms differ slightly across shards (JetStream PR #101)


def meta_shards(p: Path) -> list[Path]:
    found = []
    for f in p.iterdir():
        m = META_SHARD.match(f.name)
        if m:
            found.append((int(m.group(1)), f))
    found.sort()  # numeric, so consolidated.10 follows consolidated.9
    for want, (idx, _) in enumerate(found):
        if idx != want:
            raise InputError(p, f"Meta shard consolidated.{want:02d}.pth is missing "
                                f"(found {len(found)} shards, indices {[i for i, _ in found]})")
    return [f for _, f in found]


def meta_axis(key: str, shard_shape, params: dict, n_shards: int) -> "Shard | None":
    """How Meta shards of ``key`` were cut (None: no rule). Where the cut depends on the Llama version
    (the embedding), the version is the one whose merged shape has ``params["dim"]`` columns."""
    row = META_SHARDS.row(key)
    if row is None or isinstance(row.how, Shard):
        return None if row is None else row.how
    dim = params.get("dim")
    for how in row.how.values():
        cols = shard_shape[-1] * (n_shards if how is Shard.COLS else 1)
        if dim and cols == dim:
            return how
    return row.cut()


def read_meta_dir(p: Path, trust_pickle=False, fmt="meta", **_) -> Checkpoint:
    params = _json(p / "params.json") if (p / "params.json").is_file() else {}
    shards = meta_shards(p)
    if not shards:
        raise InputError(p, "no consolidated.NN.pth shards")
    per = [read_pickle_tensors(s, trust_pickle) for s in shards]
    from ckdiff.models.config import valid_int
    n_kv = valid_int(params.get("n_kv_heads")) or valid_int(params.get("n_heads"))
    if len(shards) > 1 and n_kv and n_kv < len(shards):
        raise InputError(p, f"{n_kv} KV heads over {len(shards)} shards: KV heads are duplicated "
                            "across shards and cannot be merged by concatenation")
    keys = list(per[0])
    spread = {}
    tensors: dict[str, LazyTensor] = {}
    for i, shard in enumerate(per[1:], 1):
        if set(shard) != set(keys):
            missing = sorted(set(keys) ^ set(shard))[:3]
            raise InputError(shards[i], f"keys differ from {shards[0].name}: {missing}")
    for k in keys:
        parts = [s[k] for s in per]
        check_same_dtype(k, parts, shards)
        if len(parts) == 1:
            tensors[k] = parts[0]
            continue
        how = meta_axis(k, parts[0].shape, params, len(parts))
        if how is Shard.REPLICATED:
            ref = parts[0].load().float()
            d = max(float((q.load().float() - ref).abs().max()) for q in parts[1:]) if ref.numel() else 0.0
            spread[k] = d
            if d > REPLICA_ATOL:
                raise InputError(p, f"replicated tensor {k!r} differs across shards by {d:.3g}")
            tensors[k] = parts[0]
        elif how is None:
            raise InputError(p, f"no merge rule for Meta tensor {k!r}")
        else:
            for q, f in zip(parts[1:], shards[1:]):
                other = [s for j, s in enumerate(q.shape) if j != how.axis]
                if other != [s for j, s in enumerate(parts[0].shape) if j != how.axis]:
                    raise InputError(f, f"{k!r} shape {list(q.shape)} disagrees with shard 0 {list(parts[0].shape)}")
            try:
                tensors[k] = DerivedGroup(parts, ShardSplit(how, len(parts)).reverse()).tensors([k])[0]
            except (ValueError, RuntimeError) as e:
                raise InputError(p, f"cannot merge the shards of {k!r}: {e}") from None
    return Checkpoint(str(p), fmt, tensors, config=params,
                      meta={"files": [str(s) for s in shards], "replica_spread": spread})


def check_same_dtype(name: str, parts: list[LazyTensor], files: list) -> None:
    """Shards of one tensor must agree in dtype: merging a float64 shard into bf16 ones hides a cast."""
    for q, f in zip(parts[1:], files[1:]):
        if q.dtype != parts[0].dtype:
            raise InputError(f, f"shards disagree in dtype for {name!r}: {dtype_name(q.dtype)} here, "
                                f"{dtype_name(parts[0].dtype)} in {Path(files[0]).name}")


def is_meta_dir(p: Path) -> bool:
    return p.is_dir() and any(META_SHARD.match(f.name) for f in p.iterdir()) and \
        (p / "params.json").is_file() and not (p / "checklist.chk").is_file()


# ---------------------------------------------------------------- JetStream output
def is_jetstream_dir(p: Path) -> bool:
    return p.is_dir() and not (p / "config.json").is_file() and (
        ((p / "model.safetensors").is_file() and (p / "params.json").is_file())
        or (p / "checklist.chk").is_file())


def read_jetstream(p: Path, trust_pickle=False, **_) -> Checkpoint:
    if (p / "model.safetensors").is_file():
        params = _json(p / "params.json") if (p / "params.json").is_file() else {}
        return Checkpoint(str(p), "jetstream", read_safetensors(p / "model.safetensors"),
                          config=params, meta={"files": [str(p / "model.safetensors")]})
    return read_meta_dir(p, trust_pickle, fmt="jetstream")


# ---------------------------------------------------------------- declarations (formats/registry.py)
def _hf_config(raw: dict, tensors: dict, where: str):
    from ckdiff.models.config import ModelConfig  # looked up per call: tests/selftest/catalogue.py swaps ModelConfig.from_hf
    return ModelConfig.from_hf(raw, tensors, where)


def _meta_config(raw: dict, tensors: dict, where: str):
    from ckdiff.models.config import ModelConfig
    return ModelConfig.from_meta(raw, tensors, where)


def _declare() -> None:
    from ckdiff.models.config import _canonical_hf, _canonical_meta
    from ckdiff.formats.layouts import DROP
    register = registry.register
    # the mapping-free formats read the generic layer pattern (layers.N., h.N., blk.N.)
    register(Format("file", "a single .safetensors, .bin, .pt, .pth or .ckpt file", is_tensor_file, read_file,
                    priority=10, input=Input.FILE))
    register(Format("hf", "Hugging Face directory: config.json with model.safetensors, sharded *.safetensors + "
                          "index, or pytorch_model*.bin", is_hf_dir, read_hf, priority=60, layout="hf",
                    config_file="config.json", config=_hf_config, canonical=_canonical_hf,
                    drop=tuple(DROP["hf"]), runtime=Runtime.NATIVE, layer=r"(?:^|\.)(?:layers|h)\.(\d+)\."))
    register(Format("tensors", "a directory of tensor files without a model config (model.safetensors, shards + "
                               "index, or .bin/.pt/.pth files): a plain set of tensors, compared by name",
                    is_tensor_dir, read_tensor_dir, priority=90))
    meta = dict(names="meta", config_file="params.json", config=_meta_config, canonical=_canonical_meta,
                runtime=Runtime.NATIVE, layer=r"^layers\.(\d+)\.")
    register(Format("meta", "Meta directory: consolidated.NN.pth shards + params.json", is_meta_dir, read_meta_dir,
                    priority=50, layout="meta", drop=tuple(DROP["meta"]), **meta))
    register(Format("jetstream", "JetStream-pt directory: model.safetensors (or consolidated.00.pth + checklist.chk) "
                                 "with params.json, Meta names, optional *_scaler", is_jetstream_dir, read_jetstream,
                    priority=40, layout="jetstream", drop=tuple(DROP["jetstream"]), **meta))


_declare()


# ---------------------------------------------------------------- entry points
def resolve_path(spec: str, cache_dir: str | None = None) -> Path:
    """A local path, or a hub repo id resolved through the local HF cache only."""
    p = Path(spec)
    try:
        stat_input(p)
        return p
    except InputError:
        if os.path.lexists(p) or len(os.fsencode(spec)) > 255 or "\x00" in spec:
            raise  # a symbolic-link loop, a dangling link, a name too long: name the real problem
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(spec, cache_dir=cache_dir, local_files_only=True))
        except Exception as e:  # hub raises many kinds; all mean "not in the local cache"
            raise InputError(spec, f"not a local path, and not in the local Hugging Face cache "
                                   f"({e.__class__.__name__}); nothing is downloaded") from None
    raise InputError(spec, "no such file or directory")


def _parent_hint(p: Path) -> str:
    """When ``p`` lies inside a checkpoint (a Megatron iteration or rank directory), name the root to pass."""
    for up in list(p.resolve().parents)[:2]:
        if (up / "latest_checkpointed_iteration.txt").is_file():
            return f"it lies inside the Megatron-LLM checkpoint {up}: pass that directory instead"
    return ""


def detect_format(p: Path) -> str:
    """The name of the first registered format, in priority order, that recognises ``p``."""
    mode = stat_input(p).st_mode  # a loop, a dangling link, a name too long: named errors
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise InputError(p, f"is {kind_of(mode)}, expected a checkpoint file or directory")
    if p.is_dir():
        f = registry.detect(p, Input.DIR)
        if f is not None:
            return f.name
        try:
            names = sorted(f.name for f in p.iterdir())[:8]
        except PermissionError as e:
            raise InputError(p, f"cannot list directory: {e.strerror}") from None
        if not names:
            raise InputError(p, "empty directory: no checkpoint found")
        hint = _parent_hint(p)
        raise InputError(p, f"unknown checkpoint layout (found {', '.join(names)}); "
                            + (hint or f"use --format {{{','.join(registry.names())}}}"))
    f = registry.detect(p, Input.FILE)
    if f is not None:
        return f.name
    raise InputError(p, f"unknown file type {p.suffix or '(no suffix)'}: expected .safetensors, "
                        ".bin, .pt, .pth or .ckpt (or a .gguf file)")


def open_checkpoint(spec: str, fmt: str | None = None, cache_dir: str | None = None,
                    trust_pickle: bool = False, *, stored: bool = False, prefix: str | None = None) -> Checkpoint:
    """Read any supported checkpoint lazily; ``fmt`` overrides detection. Encoded tensors (codes with
    block scales) are logical block-scaled views unless ``stored`` asks for the tensors as stored.
    ``prefix`` keeps only the tensors named ``prefix...`` (stripped), e.g. the ``model.`` sub-tree of a
    trainer's state dict."""
    path = resolve_path(spec, cache_dir)
    if fmt is None:
        fmt = detect_format(path)
    elif fmt not in registry.names():
        raise UsageError(f"unknown --format {fmt!r}; known: {', '.join(registry.names())}")
    from ckdiff.io.inputs import note_input
    note_input(path)  # the checkpoint as named (a save root above the directory read, too)
    ck = registry.get(fmt).read(path, trust_pickle=trust_pickle, prefix=prefix)
    for f in [ck.path, *ck.meta.get("files", [])]:
        note_input(f)
    if prefix and ck.meta.get("prefix") != prefix:  # a reader that selects sub-trees itself says so
        from ckdiff.formats.dcp import select_prefix
        ck = select_prefix(ck, prefix, "--prefix")
    if not ck.tensors:
        raise InputError(path, f"no tensors found (read as {fmt})")
    return ck if stored else registry.apply_encodings(ck)


_DTYPE_NAMES: dict = {}


