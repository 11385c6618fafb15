"""``ckdiff convert ...``: the converters, with the original tools' flags.

read -> canonical view (ModelConfig + HF-layout lazy tensors) -> transform -> write.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CkdiffError, InputError, UsageError
from .config import ModelConfig, model_config
from .formats import open_checkpoint, resolve_path
from .layouts import convert
from .table import Plan
from .writers import atomic_dir, copy_if_exists, disk_errors, write_hf, write_meta_like

LLAMA_MODELS = ("llama", "llama2", "codellama", "mistral")
MEGATRON_MODELS = LLAMA_MODELS + ("falcon",)
# the original's size table (L, H, n, n_kv), used only to check --size against the config
SIZES = {
    ("llama", 7): (32, 4096, 32, 32), ("llama", 13): (40, 5120, 40, 40), ("llama", 30): (60, 6656, 52, 52),
    ("llama", 65): (80, 8192, 64, 64), ("llama2", 7): (32, 4096, 32, 32), ("llama2", 13): (40, 5120, 40, 40),
    ("llama2", 70): (80, 8192, 64, 8), ("codellama", 7): (32, 4096, 32, 32), ("codellama", 13): (40, 5120, 40, 40),
    ("codellama", 34): (48, 8192, 64, 8), ("mistral", 7): (32, 4096, 32, 8), ("falcon", 7): (32, 4544, 71, 1),
    ("falcon", 40): (60, 8192, 128, 8),
}
# where the original took a tokenizer from when --vocab_file was not given (looked up in the local cache only)
DEFAULT_TOKENIZERS = {"llama": "meta-llama/Llama-2-7b-hf", "llama2": "meta-llama/Llama-2-7b-hf",
                      "codellama": "TheBloke/CodeLlama-13B-fp16", "mistral": "mistralai/Mistral-7B-v0.1"}
DEFAULT_SOURCES = {"falcon": "tiiuae/falcon-{size}b", "mistral": "mistralai/Mistral-7B-v0.1",
                   "llama": "decapoda-research/llama-{size}b-hf", "llama2": "meta-llama/Llama-2-{size}b-hf",
                   "codellama": "codellama/CodeLlama-{size}b-hf"}


class _P(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "y"):
        return True
    if v.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def _flag(p, name, default=False, help=""):
    """--x, --x=True/False and --no-x (the originals use absl-style booleans)."""
    dest = name.lstrip("-").replace("-", "_")
    p.add_argument(name, dest=dest, type=str2bool, nargs="?", const=True, default=default, help=help)
    p.add_argument("--no" + name[1:] if name.startswith("--") else name, "--no_" + name[2:],
                   dest=dest, action="store_false")


def _progress(a):
    """A progress bar on stderr (bytes written, rate) unless it is not a terminal or --quiet is given."""
    import sys
    from ..cli import _progress_factory
    return _progress_factory(sys.stderr.isatty() and not getattr(a, "quiet", False), "writing")


def read_source(spec: str, cache_dir=None, trust_pickle=False, fmt=None):
    """Checkpoint plus its canonical config."""
    ck = open_checkpoint(spec, fmt, cache_dir, trust_pickle)
    return ck, model_config(ck)


def _run_guarded(fn):
    """Op failures while writing (a tie that does not hold, a bad shape) -> one-line input errors."""
    try:
        return fn()
    except CkdiffError:
        raise
    except (ValueError, RuntimeError) as e:
        raise InputError("input", f"conversion failed: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------- hf-to-megatron
def hf_to_megatron(argv) -> int:
    from .megatron import check_parallel, make_args, pad_vocab_tensors, padded_vocab, write_megatron
    p = _P(prog="ckdiff convert hf-to-megatron", description="HF or Meta weights -> Megatron-LLM checkpoint")
    p.add_argument("model", choices=MEGATRON_MODELS)
    p.add_argument("--size", type=int, choices=sorted({s for _, s in SIZES}),
                   help="checked against the checkpoint's config (the architecture comes from the config)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model-path", "--model_path", dest="model_path", help="local directory or hub id")
    p.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", help="HF cache; also probed for Meta weights")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to write")
    p.add_argument("--true-vocab-size", type=int, help="real vocabulary rows (the rest is padding)")
    p.add_argument("--make-vocab-size-divisible-by", type=int,
                   help="pad the vocab to a multiple of this x TP (default: pad only when TP does not divide it)")
    p.add_argument("--legacy-rotate-half", action="store_true",
                   help="write q/k unpermuted for Megatron-LLM before 2023-08-01 (rotate_half model code)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--trust-pickle", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    src = a.model_path
    if src is None and a.cache_dir and a.model != "falcon" and list(Path(a.cache_dir).glob("consolidated.*.pth")):
        src = a.cache_dir  # the original reads Meta weights from --cache-dir
    if src is None:
        src = DEFAULT_SOURCES[a.model].format(size=a.size or 7)
    ck, cfg = read_source(src, a.cache_dir, a.trust_pickle)
    if ck.format not in ("hf", "meta"):
        raise InputError(ck.path, f"expected an HF or Meta checkpoint, found {ck.format}")
    if (a.model == "falcon") != (cfg.family == "falcon"):
        raise UsageError(f"model {a.model!r} does not match the checkpoint's architecture ({cfg.family})")
    if ck.format == "meta" and a.model not in ("llama", "llama2", "codellama"):
        raise UsageError(f"Meta weights are a source for llama, llama2 and codellama, not {a.model}")
    if a.size is not None and (a.model, a.size) in SIZES:
        want = SIZES[(a.model, a.size)]
        have = (cfg.layers, cfg.hidden, cfg.heads, cfg.kv_heads)
        if want != have:
            raise UsageError(f"--size {a.size} expects (layers, hidden, heads, kv heads) {want}, "
                             f"the checkpoint has {have}")
    check_parallel(cfg, a.tp, a.pp)
    if a.model == "mistral":
        cfg.extra["model_type"] = "mistral"
    if a.legacy_rotate_half:
        cfg.extra["rotary"] = "rotate_half"
    true_vocab = a.true_vocab_size or cfg.vocab
    if true_vocab > cfg.vocab:
        raise UsageError(f"--true-vocab-size {true_vocab} exceeds the {cfg.vocab} embedding rows")
    rows = padded_vocab(true_vocab, a.tp, a.make_vocab_size_divisible_by)
    if rows < cfg.vocab:
        raise UsageError(f"padding to {rows} rows would drop {cfg.vocab - rows} trained rows")
    if rows % a.tp:
        raise UsageError(f"TP={a.tp} does not divide the padded vocab {rows}")
    tensors = convert(ck.tensors, ck.format, "megatron", cfg, ck.path)
    tensors = pad_vocab_tensors(tensors, rows)
    args = make_args(cfg, a.model, a.tp, a.pp, rows, true_vocab, a.make_vocab_size_divisible_by or 128)
    with disk_errors(a.out), atomic_dir(a.out, a.overwrite, [ck.path]) as tmp:
        _run_guarded(lambda: write_megatron(tmp, tensors, cfg, a.tp, a.pp, args, _progress(a)))
        copy_if_exists(Path(ck.path), ["tokenizer.model"], tmp)
    print(f"wrote Megatron checkpoint {a.out} (TP={a.tp}, PP={a.pp}, vocab rows {rows}, true vocab {true_vocab})")
    return 0


# ---------------------------------------------------------------- megatron-to-hf
def megatron_to_hf(argv) -> int:
    from .megatron import config_from_args, strip_vocab
    p = _P(prog="ckdiff convert megatron-to-hf", description="Megatron-LLM checkpoint (any TP/PP) -> HF")
    p.add_argument("--input_dir", "--input-dir", required=True, help="root holding latest_checkpointed_iteration.txt")
    p.add_argument("--output_dir", "--output-dir", required=True)
    p.add_argument("--model", choices=MEGATRON_MODELS, default=None, help="default: from the checkpoint's args")
    p.add_argument("--num_output_shards", type=int, default=1)
    p.add_argument("--cache_dir", help="HF cache searched (offline) for the model's default tokenizer "
                                       "when neither --vocab_file nor <input_dir>/tokenizer.model exists")
    p.add_argument("--vocab_file", help="SentencePiece tokenizer.model (or its directory)")
    p.add_argument("--vocab_extra_ids_list", default="", help="comma-separated extra tokens")
    p.add_argument("--override_special_tokens", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--true_vocab_size", type=int, help="strip padding rows beyond this (default: from args)")
    p.add_argument("--rotary_convention", choices=("interleaved", "rotate_half"),
                   help="q/k row order of the input: interleaved (Megatron-LLM since 2023-08-01) or rotate_half "
                        "(older checkpoints, which the weights alone cannot reveal); default: from args, "
                        "else interleaved")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--trust-pickle", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    ck = open_checkpoint(a.input_dir, "megatron", None, a.trust_pickle)
    cfg = config_from_args(ck.config, ck.tensors, ck.path)
    if a.rotary_convention:
        cfg.extra["rotary"] = a.rotary_convention
    if a.model:
        if (a.model == "falcon") != (cfg.family == "falcon"):
            raise UsageError(f"--model {a.model} does not match the checkpoint ({cfg.family})")
        if a.model == "mistral":
            cfg.extra["model_type"] = "mistral"
    true_vocab = a.true_vocab_size or ck.config.get("true_vocab_size") or cfg.vocab
    tensors = strip_vocab(ck.tensors, true_vocab)
    cfg.vocab = min(cfg.vocab, true_vocab)
    hf = convert(tensors, "megatron", "hf", cfg, ck.path)
    vocab_file = a.vocab_file
    if vocab_file is None and (Path(a.input_dir) / "tokenizer.model").is_file():
        vocab_file = str(Path(a.input_dir) / "tokenizer.model")
    model = a.model or cfg.extra.get("model")
    if vocab_file is None and a.cache_dir and model in DEFAULT_TOKENIZERS:
        try:
            cached = resolve_path(DEFAULT_TOKENIZERS[model], a.cache_dir) / "tokenizer.model"
            vocab_file = str(cached) if cached.is_file() else None
        except InputError:
            vocab_file = None
    if vocab_file is None and cfg.family != "falcon":
        print("no tokenizer exported: pass --vocab_file (or --cache_dir holding the default tokenizer)")
    with disk_errors(a.output_dir), atomic_dir(a.output_dir, a.overwrite, [a.input_dir]) as tmp:
        _run_guarded(lambda: write_hf(tmp, hf, cfg.to_hf(), a.num_output_shards, _progress(a)))
        if vocab_file:
            from .tokenizer import export_tokenizer
            export_tokenizer(vocab_file, tmp, cfg.vocab,
                             [t for t in a.vocab_extra_ids_list.split(",") if t], a.override_special_tokens)
    print(f"wrote HF checkpoint {a.output_dir} (vocab {cfg.vocab}, {a.num_output_shards} shard(s))")
    return 0


# ---------------------------------------------------------------- to-jetstream
JS_MODELS = {"llama": "llama-2", "llama-2": "llama-2", "llama-3": "llama-3", "gemma": "gemma", "mixtral": "mixtral"}


def to_jetstream(argv) -> int:
    from .quant import quantize_tensors
    p = _P(prog="ckdiff convert to-jetstream", description="HF or Meta weights -> JetStream-pt checkpoint")
    p.add_argument("--model_name", required=True, choices=sorted(JS_MODELS))
    p.add_argument("--input_checkpoint_dir", required=True)
    p.add_argument("--output_checkpoint_dir", required=True)
    _flag(p, "--from_hf", help="input is an HF checkpoint (detected from the files anyway)")
    _flag(p, "--quantize_weights")
    p.add_argument("--quantize_type", default="int8_per_channel")
    _flag(p, "--output_safetensors", default=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--trust-pickle", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    model = JS_MODELS[a.model_name]
    ck, cfg = read_source(a.input_checkpoint_dir, None, a.trust_pickle)
    family = {"llama-2": "llama", "llama-3": "llama"}.get(model, model)
    if cfg.family != family:
        raise UsageError(f"--model_name {a.model_name} expects a {family} checkpoint; the input is {cfg.family}")
    if family != "llama" and ck.format != "hf":
        raise UsageError(f"--model_name {a.model_name}: only HF sources are supported for {family}")
    if a.from_hf and ck.format != "hf":
        raise InputError(ck.path, f"--from_hf given but the input is a {ck.format} checkpoint")
    if ck.format not in ("hf", "meta"):
        raise InputError(ck.path, f"expected an HF or Meta checkpoint, found {ck.format}")
    plan = Plan()
    tensors = convert(ck.tensors, ck.format, "jetstream", cfg, ck.path, plan)
    params = cfg.to_meta()
    if a.quantize_weights:
        tensors = quantize_tensors(tensors, a.quantize_type, cfg.family)
        params["quantize_type"] = a.quantize_type
    with disk_errors(a.output_checkpoint_dir), atomic_dir(a.output_checkpoint_dir, a.overwrite,
                                                          [ck.path]) as tmp:
        _run_guarded(lambda: write_meta_like(tmp, tensors, params, a.output_safetensors, _progress(a)))
    print(f"wrote JetStream checkpoint {a.output_checkpoint_dir} ({len(tensors)} tensors"
          f"{', ' + a.quantize_type if a.quantize_weights else ''})")
    return 0


def jetstream_to_hf(argv) -> int:
    from .quant import dequantize_tensors, is_quantized
    p = _P(prog="ckdiff convert jetstream-to-hf", description="JetStream-pt checkpoint -> HF (dequantized if needed)")
    p.add_argument("--input_checkpoint_dir", required=True)
    p.add_argument("--output_checkpoint_dir", required=True)
    p.add_argument("--num_output_shards", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--trust-pickle", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    ck = open_checkpoint(a.input_checkpoint_dir, None, None, a.trust_pickle)
    if ck.format not in ("jetstream", "meta"):
        raise InputError(ck.path, f"expected a JetStream checkpoint, found {ck.format}")
    tensors = ck.tensors
    if is_quantized(tensors):
        tensors = dequantize_tensors(tensors)
    cfg = ModelConfig.from_meta(ck.config, tensors, str(Path(ck.path) / "params.json"))
    if is_quantized(ck.tensors):
        cfg.dtype = "float32"
    hf = convert(tensors, "jetstream", "hf", cfg, ck.path)
    with disk_errors(a.output_checkpoint_dir), atomic_dir(a.output_checkpoint_dir, a.overwrite,
                                                          [ck.path]) as tmp:
        _run_guarded(lambda: write_hf(tmp, hf, cfg.to_hf(), a.num_output_shards, _progress(a)))
    print(f"wrote HF checkpoint {a.output_checkpoint_dir}"
          + (" (dequantized to float32)" if is_quantized(ck.tensors) else ""))
    return 0


COMMANDS = {"hf-to-megatron": hf_to_megatron, "megatron-to-hf": megatron_to_hf,
            "to-jetstream": to_jetstream, "jetstream-to-hf": jetstream_to_hf}


def cmd_convert(argv) -> int:
    if not argv or argv[0] not in COMMANDS:
        raise UsageError(f"ckdiff convert: expected one of {', '.join(COMMANDS)}")
    return COMMANDS[argv[0]](argv[1:])

