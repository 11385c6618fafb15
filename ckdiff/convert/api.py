"""The converters as library functions (``ckdiff convert`` parses its flags in ckdiff/commands/convert.py).

read -> canonical view (ModelConfig + HF-layout lazy tensors) -> transform -> write.
Each function writes its output atomically and returns a ``Written`` summary; none prints.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from ckdiff.models import families
from ckdiff.errors import CkdiffError, InputError, UsageError
from ckdiff.models.config import ModelConfig, config_where, model_config
from ckdiff.convert.faults import NONE as NO_FAULTS, Faults, Step
from ckdiff.formats.readers import open_checkpoint, resolve_path
from ckdiff.formats import layouts
from ckdiff.tensor.table import Plan
from ckdiff.io.writers import atomic_output, copy_if_exists, write_hf, write_meta_like

# Megatron-LLM --model values, the original's size table (L, H, n, n_kv; used only to check --size against
# the config) and default sources / tokenizers: all from the families' declarations (ckdiff/models/families/)
MEGATRON_MODELS = families.megatron_models()
SIZES = {(m.name, size): dims for f in families.FAMILIES.values() for m in f.megatron_models
         for size, dims in m.sizes.items()}


def _megatron_model(name: str):
    """(family, MegatronModel) of a --model value, or a usage error naming the choices."""
    fam = families.for_megatron_model(name)
    if fam is None and families.get(name) is not None:  # a family without the layout: say why
        raise UsageError(f"model {name!r}: {families.get(name).no_layout('megatron')}")
    if fam is None:
        raise UsageError(f"model {name!r}: expected one of {', '.join(families.megatron_models())}")
    return fam, fam.megatron_model(name)


@dataclass
class Written:
    """What a conversion wrote: the output directory, a one-line summary and notes for the user."""
    path: str
    summary: str
    notes: list = field(default_factory=list)


def default_source(model: str, size: Optional[int]) -> str:
    """The hub id the original tool used when no --model-path was given."""
    source = _megatron_model(model)[1].source
    if source is None:
        raise UsageError(f"model {model!r} has no default source: pass --model-path")
    return source.format(size=size or 7)


class _NS:
    """Attribute access to a conversion's settings (the bodies below read ``a.name``)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def read_source(spec: str, cache_dir=None, trust_pickle=False, fmt=None, faults: Optional[Faults] = None,
                step: Optional[Step] = None):
    """Checkpoint plus its canonical config (through ``faults``' read and parse hooks when given)."""
    F = faults or NO_FAULTS
    ck = F.on_read(complete(open_checkpoint(spec, fmt, cache_dir, trust_pickle)), step or Step("read", ""))
    return ck, F.on_parsed(model_config(ck))


def complete(ck):
    """``ck``, refused in one line when its reader left a tensor out for lack of a shard (a Megatron-LLM TP
    rank file without it, formats/megatron_llm.py): a comparison reports that, a converter must not write
    a model without it."""
    for f, problem in (ck.meta or {}).get("incomplete", {}).values():
        raise InputError(f, f"{problem}; refusing to convert an incomplete checkpoint")
    return ck


def _run_guarded(fn):
    """Op failures while writing (a tie that does not hold, a bad shape) -> one-line input errors."""
    try:
        return fn()
    except CkdiffError:
        raise
    except (ValueError, RuntimeError) as e:
        raise InputError("input", f"conversion failed: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------- hf-to-megatron
def hf_to_megatron(model: str, out, *, model_path=None, size: Optional[int] = None, cache_dir=None, tp: int = 1,
                   pp: int = 1, true_vocab_size: Optional[int] = None,
                   make_vocab_size_divisible_by: Optional[int] = None, legacy_rotate_half: bool = False,
                   overwrite: bool = False, trust_pickle: bool = False, progress_factory=None,
                   shard=None, faults: Optional[Faults] = None) -> Written:
    """HF or Meta weights -> Megatron-LLM checkpoint at ``out`` (TP x PP rank files).
    ``faults`` (tests only): injection points, see convert/faults.py."""
    from ckdiff.formats.megatron_llm import (
        check_parallel,
        make_args,
        pad_vocab_tensors,
        padded_vocab,
        write_megatron,
    )
    fam, mm = _megatron_model(model)
    a = _NS(model=model, out=str(out), model_path=None if model_path is None else str(model_path), size=size,
            cache_dir=cache_dir, tp=tp, pp=pp, true_vocab_size=true_vocab_size,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by, legacy_rotate_half=legacy_rotate_half,
            overwrite=overwrite, trust_pickle=trust_pickle)
    src = a.model_path
    if src is None and a.cache_dir and mm.meta_source and list(Path(a.cache_dir).glob("consolidated.*.pth")):
        src = a.cache_dir  # the original reads Meta weights from --cache-dir
    if src is None:
        src = default_source(a.model, a.size)
    step = Step("hf-to-megatron", "megatron", None, a.tp, a.pp)
    ck, cfg = read_source(src, a.cache_dir, a.trust_pickle, faults=faults, step=step)
    if ck.format not in ("hf", "meta"):
        raise InputError(ck.path, f"expected an HF or Meta checkpoint, found {ck.format}")
    if fam.name != cfg.family:
        raise InputError(config_where(ck), f"--model {a.model} is a {fam.name} model, but this config describes a "
                                           f"{cfg.family} architecture")
    if ck.format == "meta" and not mm.meta_source:
        meta_ok = [m.name for f in families.FAMILIES.values() for m in f.megatron_models if m.meta_source]
        raise UsageError(f"Meta weights are a source for {', '.join(meta_ok[:-1])} and {meta_ok[-1]}, not {a.model}")
    if a.size is not None and a.size in mm.sizes:
        want = mm.sizes[a.size]
        have = (cfg.layers, cfg.hidden, cfg.heads, cfg.kv_heads)
        if want != have:
            raise UsageError(f"--size {a.size} expects (layers, hidden, heads, kv heads) {want}, "
                             f"the checkpoint has {have}")
    check_parallel(cfg, a.tp, a.pp)
    cfg = replace(cfg, hf_model_type=mm.hf_model_type or cfg.hf_model_type,
                  rotary_rows="rotate_half" if a.legacy_rotate_half else cfg.rotary_rows)
    true_vocab = a.true_vocab_size or cfg.vocab
    if true_vocab > cfg.vocab:
        raise UsageError(f"--true-vocab-size {true_vocab} exceeds the {cfg.vocab} embedding rows")
    rows = padded_vocab(true_vocab, a.tp, a.make_vocab_size_divisible_by)
    if rows < cfg.vocab:
        raise UsageError(f"padding to {rows} rows would drop {cfg.vocab - rows} trained rows")
    if rows % a.tp:
        raise UsageError(f"TP={a.tp} does not divide the padded vocab {rows}")
    tensors = layouts.convert(ck.tensors, ck.format, "megatron", cfg, ck.path, faults=faults)
    tensors = (faults or NO_FAULTS).on_output(tensors, replace(step, cfg=cfg))
    tensors = pad_vocab_tensors(tensors, rows)
    args = make_args(cfg, a.model, a.tp, a.pp, rows, true_vocab, a.make_vocab_size_divisible_by or 128)
    with atomic_output(a.out, a.overwrite, [ck.path], shard) as (tmp, files):
        _run_guarded(lambda: write_megatron(tmp, tensors, cfg, a.tp, a.pp, args,
                                            progress_factory=progress_factory, files=files))
        if files.is_main:
            copy_if_exists(Path(ck.path), ["tokenizer.model"], tmp)
    return Written(a.out, f"wrote Megatron checkpoint {a.out} (TP={a.tp}, PP={a.pp}, vocab rows {rows}, "
                          f"true vocab {true_vocab})")


# ---------------------------------------------------------------- megatron-to-hf
def megatron_to_hf(input_dir, output_dir, *, model: Optional[str] = None, num_output_shards: int = 1,
                   cache_dir=None, vocab_file=None, vocab_extra_ids_list: str = "",
                   override_special_tokens=(), true_vocab_size: Optional[int] = None,
                   rotary_convention: Optional[str] = None, overwrite: bool = False,
                   trust_pickle: bool = False, progress_factory=None, shard=None,
                   faults: Optional[Faults] = None) -> Written:
    """Megatron-LLM checkpoint (any TP/PP) -> HF safetensors (+ tokenizer files when a tokenizer is found).
    ``faults`` (tests only): injection points, see convert/faults.py."""
    from ckdiff.formats.megatron_llm import strip_vocab
    a = _NS(input_dir=str(input_dir), output_dir=str(output_dir), model=model, num_output_shards=num_output_shards,
            cache_dir=cache_dir, vocab_file=vocab_file, vocab_extra_ids_list=vocab_extra_ids_list,
            override_special_tokens=list(override_special_tokens), true_vocab_size=true_vocab_size,
            rotary_convention=rotary_convention, overwrite=overwrite, trust_pickle=trust_pickle)
    notes = []
    F, step = faults or NO_FAULTS, Step("megatron-to-hf", "hf")
    ck, cfg = read_source(a.input_dir, None, a.trust_pickle, "megatron", faults, step)
    if a.rotary_convention:
        cfg = replace(cfg, rotary_rows=a.rotary_convention)
    if a.model:
        fam, mm = _megatron_model(a.model)
        if fam.name != cfg.family:
            raise InputError(config_where(ck), f"--model {a.model} is a {fam.name} model, but this config "
                                               f"describes a {cfg.family} architecture")
        if mm.hf_model_type:
            cfg = replace(cfg, hf_model_type=mm.hf_model_type)
    true_vocab = a.true_vocab_size or ck.config.get("true_vocab_size") or cfg.vocab
    tensors = strip_vocab(ck.tensors, true_vocab)
    cfg = replace(cfg, vocab=min(cfg.vocab, true_vocab))
    hf = F.on_output(layouts.convert(tensors, "megatron", "hf", cfg, ck.path, faults=faults), replace(step, cfg=cfg))
    vocab_file = a.vocab_file
    if vocab_file is None and (Path(a.input_dir) / "tokenizer.model").is_file():
        vocab_file = str(Path(a.input_dir) / "tokenizer.model")
    fam = families.family(cfg.family)
    model = a.model or cfg.megatron_model
    default_tok = fam.megatron_model(model).tokenizer if model in fam.megatron_model_names() else None
    if vocab_file is None and a.cache_dir and default_tok:
        try:
            cached = resolve_path(default_tok, a.cache_dir) / "tokenizer.model"
            vocab_file = str(cached) if cached.is_file() else None
        except InputError:
            vocab_file = None
    if vocab_file is None and any(m.tokenizer for m in fam.megatron_models):  # a SentencePiece family
        notes.append("no tokenizer exported: pass --vocab_file (or --cache_dir holding the default tokenizer)")
    with atomic_output(a.output_dir, a.overwrite, [a.input_dir], shard) as (tmp, files):
        _run_guarded(lambda: write_hf(tmp, hf, F.on_config(cfg.to_hf(), step), a.num_output_shards,
                                      progress_factory=progress_factory, files=files))
        if vocab_file and files.is_main:
            from ckdiff.convert.tokenizer import export_tokenizer
            export_tokenizer(vocab_file, tmp, cfg.vocab,
                             [t for t in a.vocab_extra_ids_list.split(",") if t], a.override_special_tokens)
    return Written(a.output_dir, f"wrote HF checkpoint {a.output_dir} (vocab {cfg.vocab}, "
                                 f"{a.num_output_shards} shard(s))", notes)


# ---------------------------------------------------------------- to-jetstream
JS_MODELS = {n: f.name for f in families.FAMILIES.values() for n in f.jetstream_names}  # --model_name -> family


def to_jetstream(model_name: str, input_checkpoint_dir, output_checkpoint_dir, *, from_hf: bool = False,
                 quantize_weights: bool = False, quantize_type: str = "int8_per_channel",
                 output_safetensors: bool = True, overwrite: bool = False, trust_pickle: bool = False,
                 progress_factory=None, shard=None, faults: Optional[Faults] = None) -> Written:
    """HF or Meta weights -> JetStream-pt checkpoint, optionally quantized.
    ``faults`` (tests only): injection points, see convert/faults.py."""
    from ckdiff.formats.jetstream_quant import quantize_tensors
    fam = families.for_jetstream_name(model_name)
    if fam is None and families.get(model_name) is not None:  # a family without the layout: say why
        raise UsageError(f"--model_name {model_name!r}: {families.get(model_name).no_layout('jetstream')}")
    if fam is None:
        names = sorted(n for f in families.FAMILIES.values() for n in f.jetstream_names)
        raise UsageError(f"--model_name {model_name!r}: expected one of {', '.join(names)}")
    a = _NS(model_name=model_name, input_checkpoint_dir=str(input_checkpoint_dir),
            output_checkpoint_dir=str(output_checkpoint_dir), from_hf=from_hf, quantize_weights=quantize_weights,
            quantize_type=quantize_type, output_safetensors=output_safetensors, overwrite=overwrite,
            trust_pickle=trust_pickle)
    step = Step("to-jetstream", "jetstream")
    ck, cfg = read_source(a.input_checkpoint_dir, None, a.trust_pickle, faults=faults, step=step)
    if cfg.family != fam.name:
        raise InputError(config_where(ck), f"--model_name {a.model_name} expects a {fam.name} checkpoint, but this "
                                           f"config describes a {cfg.family} architecture")
    if not fam.jetstream_from_meta and ck.format != "hf":
        raise UsageError(f"--model_name {a.model_name}: only HF sources are supported for {fam.name}")
    if a.from_hf and ck.format != "hf":
        raise InputError(ck.path, f"--from_hf given but the input is a {ck.format} checkpoint")
    if ck.format not in ("hf", "meta"):
        raise InputError(ck.path, f"expected an HF or Meta checkpoint, found {ck.format}")
    plan = Plan()
    tensors = layouts.convert(ck.tensors, ck.format, "jetstream", cfg, ck.path, plan, faults=faults)
    tensors = (faults or NO_FAULTS).on_output(tensors, replace(step, cfg=cfg))
    params = cfg.to_meta()
    if a.quantize_weights:
        tensors = quantize_tensors(tensors, a.quantize_type, cfg.family)
        params["quantize_type"] = a.quantize_type
    with atomic_output(a.output_checkpoint_dir, a.overwrite, [ck.path], shard) as (tmp, files):
        _run_guarded(lambda: write_meta_like(tmp, tensors, params, a.output_safetensors,
                                             progress_factory=progress_factory, files=files))
    return Written(a.output_checkpoint_dir, f"wrote JetStream checkpoint {a.output_checkpoint_dir} ({len(tensors)} "
                                            f"tensors{', ' + a.quantize_type if a.quantize_weights else ''})")


def jetstream_to_hf(input_checkpoint_dir, output_checkpoint_dir, *, num_output_shards: int = 1,
                    overwrite: bool = False, trust_pickle: bool = False, progress_factory=None,
                   shard=None, faults: Optional[Faults] = None) -> Written:
    """JetStream-pt checkpoint -> HF (dequantized to float32 when quantized).
    ``faults`` (tests only): injection points, see convert/faults.py."""
    from ckdiff.formats.jetstream_quant import dequantize_tensors, is_quantized
    a = _NS(input_checkpoint_dir=str(input_checkpoint_dir), output_checkpoint_dir=str(output_checkpoint_dir),
            num_output_shards=num_output_shards, overwrite=overwrite, trust_pickle=trust_pickle)
    F, step = faults or NO_FAULTS, Step("jetstream-to-hf", "hf")
    ck = F.on_read(complete(open_checkpoint(a.input_checkpoint_dir, None, None, a.trust_pickle)), step)
    if ck.format not in ("jetstream", "meta"):
        raise InputError(ck.path, f"expected a JetStream checkpoint, found {ck.format}")
    tensors = ck.tensors
    if is_quantized(tensors):
        tensors = dequantize_tensors(tensors)
    cfg = F.on_parsed(ModelConfig.from_meta(ck.config, tensors, str(Path(ck.path) / "params.json")))
    if is_quantized(ck.tensors):
        cfg.dtype = "float32"
    hf = F.on_output(layouts.convert(tensors, "jetstream", "hf", cfg, ck.path, faults=faults), replace(step, cfg=cfg))
    with atomic_output(a.output_checkpoint_dir, a.overwrite, [ck.path], shard) as (tmp, files):
        _run_guarded(lambda: write_hf(tmp, hf, F.on_config(cfg.to_hf(), step), a.num_output_shards,
                                      progress_factory=progress_factory, files=files))
    return Written(a.output_checkpoint_dir, f"wrote HF checkpoint {a.output_checkpoint_dir}"
                   + (" (dequantized to float32)" if is_quantized(ck.tensors) else ""))


CONVERTERS = {"hf-to-megatron": hf_to_megatron, "megatron-to-hf": megatron_to_hf,
              "to-jetstream": to_jetstream, "jetstream-to-hf": jetstream_to_hf}
