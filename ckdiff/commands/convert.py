"""``ckdiff convert CONVERTER ...``: the converters, with the original tools' flags (the converters
library is imported when a parser is built or a converter runs, not with this module)."""
from __future__ import annotations

import argparse

from ckdiff.errors import InputError, UsageError
from ckdiff.text import printable
from ckdiff.commands import common

NAME = "convert"
SUMMARY = "convert a checkpoint: hf-to-megatron, megatron-to-hf, to-jetstream, jetstream-to-hf"
CONVERTERS = {
    "hf-to-megatron": "HF or Meta weights -> Megatron-LLM checkpoint (any TP/PP)",
    "megatron-to-hf": "Megatron-LLM checkpoint (any TP/PP) -> HF safetensors + tokenizer",
    "to-jetstream": "HF or Meta weights -> JetStream-pt checkpoint, optionally int8/int4 quantized",
    "jetstream-to-hf": "JetStream-pt checkpoint -> HF (dequantized to float32 when quantized)",
}


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
    p.add_argument(name, dest=dest, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL",
                   help=help)
    p.add_argument("--no" + name[1:], "--no_" + name[2:], dest=dest, action="store_false",
                   help=f"the same as {name}=False")


def _outputs(p):
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--workers", type=common.workers_arg, default=1, metavar="N",
                   help="write the output files from N local processes (torch.distributed on 127.0.0.1; "
                        "default 1); under torchrun the launcher's ranks are used instead")


def _hf_to_megatron(p):
    from ckdiff.convert import api
    p.add_argument("model", choices=api.MEGATRON_MODELS, help="model family to write")
    p.add_argument("--size", type=int, choices=sorted({s for _, s in api.SIZES}),
                   help="billions of parameters; checked against the checkpoint's config (the architecture "
                        "comes from the config) and picks the default --model-path")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (required)")
    p.add_argument("--model-path", "--model_path", dest="model_path", metavar="DIR",
                   help="local HF or Meta directory, or a hub id in the local cache (default: the original "
                        "tool's hub id for MODEL and --size, e.g. meta-llama/Llama-2-7b-hf, looked up in the "
                        "local cache only)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to write")
    p.add_argument("--true-vocab-size", type=int, metavar="N", help="real vocabulary rows (the rest is padding)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, metavar="N",
                   help="pad the vocab to a multiple of N x TP (default: pad only when TP does not divide it)")
    p.add_argument("--legacy-rotate-half", action="store_true",
                   help="write q/k unpermuted for Megatron-LLM before 2023-08-01 (rotate_half model code)")
    _outputs(p)
    common.add_common(p)  # --cache-dir/--cache_dir: HF cache, also probed for Meta weights


def _megatron_to_hf(p):
    from ckdiff.convert import api
    p.add_argument("--input_dir", "--input-dir", required=True, metavar="DIR",
                   help="root holding latest_checkpointed_iteration.txt (required)")
    p.add_argument("--output_dir", "--output-dir", required=True, metavar="DIR", help="output directory (required)")
    p.add_argument("--model", choices=api.MEGATRON_MODELS, default=None,
                   help="model family (default: from the checkpoint's args)")
    p.add_argument("--num_output_shards", type=int, default=1, metavar="N", help="safetensors shards to write")
    p.add_argument("--vocab_file", metavar="PATH", help="SentencePiece tokenizer.model (or its directory)")
    p.add_argument("--vocab_extra_ids_list", default="", metavar="TOKENS", help="comma-separated extra tokens")
    p.add_argument("--override_special_tokens", nargs="*", default=[], metavar="KEY=VALUE",
                   help="special tokens to set in the exported tokenizer")
    p.add_argument("--true_vocab_size", type=int, metavar="N",
                   help="strip padding rows beyond this (default: from args)")
    p.add_argument("--rotary_convention", choices=("interleaved", "rotate_half"),
                   help="q/k row order of the input: interleaved (Megatron-LLM since 2023-08-01) or rotate_half "
                        "(older checkpoints, which the weights alone cannot reveal); default: from args, "
                        "else interleaved")
    _outputs(p)
    common.add_common(p)  # --cache_dir: searched (offline) for the model's default tokenizer


def _to_jetstream(p):
    from ckdiff.convert import api
    from ckdiff.formats.jetstream_quant import QUANT_TYPES
    p.add_argument("--model_name", required=True, choices=sorted(api.JS_MODELS),
                   help="model family (llama is an alias of llama-2) (required)")
    p.add_argument("--input_checkpoint_dir", required=True, metavar="DIR", help="HF or Meta directory (required)")
    p.add_argument("--output_checkpoint_dir", required=True, metavar="DIR", help="output directory (required)")
    _flag(p, "--from_hf", help="input is an HF checkpoint (detected from the files anyway)")
    _flag(p, "--quantize_weights", help="quantize the weights with --quantize_type")
    p.add_argument("--quantize_type", default="int8_per_channel",
                   choices=QUANT_TYPES,
                   help="quantization scheme (with --quantize_weights)")
    _flag(p, "--output_safetensors", default=True,
          help="write model.safetensors (else consolidated.00.pth) [default: True]")
    _outputs(p)
    common.add_common(p, cache=False)


def _jetstream_to_hf(p):
    p.add_argument("--input_checkpoint_dir", required=True, metavar="DIR", help="JetStream-pt directory (required)")
    p.add_argument("--output_checkpoint_dir", required=True, metavar="DIR", help="output directory (required)")
    p.add_argument("--num_output_shards", type=int, default=1, metavar="N", help="safetensors shards to write")
    _outputs(p)
    common.add_common(p, cache=False)


BUILD = {"hf-to-megatron": _hf_to_megatron, "megatron-to-hf": _megatron_to_hf,
         "to-jetstream": _to_jetstream, "jetstream-to-hf": _jetstream_to_hf}


def parser(prog: str = "ckdiff convert"):
    p = common.Parser(prog=prog, description="Convert a checkpoint. Each converter keeps the original tool's "
                      "flags; outputs appear only by atomic rename. Exit 0 written, 2 error.",
                      epilog="ckdiff convert CONVERTER --help shows a converter's flags.")
    sub = p.add_subparsers(dest="converter", metavar="CONVERTER", title="converters", required=True,
                           parser_class=common.Parser, help="one of the converters below, then its flags")
    for name, line in CONVERTERS.items():
        BUILD[name](sub.add_parser(name, help=line, description=line))
    return p


def _default_source_hint(a) -> None:
    """Without --model-path the source is the original tool's hub id: say so when it is not cached."""
    from pathlib import Path

    from ckdiff.convert import api
    from ckdiff.formats.readers import resolve_path
    if a.model_path is not None:
        return
    from ckdiff.models import families
    fam = families.for_megatron_model(a.model)
    meta_ok = fam is not None and fam.megatron_model(a.model).meta_source
    if a.cache_dir and meta_ok and list(Path(a.cache_dir).glob("consolidated.*.pth")):
        return  # Meta weights read from --cache-dir, as the original did
    src = api.default_source(a.model, a.size)
    try:
        resolve_path(src, a.cache_dir)
    except InputError:
        raise UsageError(f"no --model-path given: the default source for {a.model}"
                         f"{' --size ' + str(a.size) if a.size else ''} is the hub id {src}, which is not in the "
                         f"local Hugging Face cache{' ' + a.cache_dir if a.cache_dir else ''} (nothing is "
                         f"downloaded); pass --model-path DIR with a local HF or Meta directory") from None


def run(argv, command: str = "") -> int:
    a = parser().parse_args(argv)
    return common.run_sharded("convert", argv, a.workers, lambda shard: _run(a, shard))


def _run(a, shard) -> int:
    from ckdiff.convert import api
    name = a.converter
    main_rank = shard is None or shard.is_main
    pf = common.progress_factory(common.show_progress(a) and main_rank, "writing")
    progress = {"progress_factory": pf, "shard": shard}
    if name == "hf-to-megatron":
        _default_source_hint(a)
        w = api.hf_to_megatron(a.model, a.out, model_path=a.model_path, size=a.size, cache_dir=a.cache_dir,
                               tp=a.tp, pp=a.pp, true_vocab_size=a.true_vocab_size,
                               make_vocab_size_divisible_by=a.make_vocab_size_divisible_by,
                               legacy_rotate_half=a.legacy_rotate_half, overwrite=a.overwrite,
                               trust_pickle=a.trust_pickle, **progress)
    elif name == "megatron-to-hf":
        w = api.megatron_to_hf(a.input_dir, a.output_dir, model=a.model, num_output_shards=a.num_output_shards,
                               cache_dir=a.cache_dir, vocab_file=a.vocab_file,
                               vocab_extra_ids_list=a.vocab_extra_ids_list,
                               override_special_tokens=a.override_special_tokens,
                               true_vocab_size=a.true_vocab_size, rotary_convention=a.rotary_convention,
                               overwrite=a.overwrite, trust_pickle=a.trust_pickle, **progress)
    elif name == "to-jetstream":
        w = api.to_jetstream(a.model_name, a.input_checkpoint_dir, a.output_checkpoint_dir, from_hf=a.from_hf,
                             quantize_weights=a.quantize_weights, quantize_type=a.quantize_type,
                             output_safetensors=a.output_safetensors, overwrite=a.overwrite,
                             trust_pickle=a.trust_pickle, **progress)
    else:
        w = api.jetstream_to_hf(a.input_checkpoint_dir, a.output_checkpoint_dir,
                                num_output_shards=a.num_output_shards, overwrite=a.overwrite,
                                trust_pickle=a.trust_pickle, **progress)
    if not main_rank:
        return 0
    console = common.console(a)
    for n in w.notes:
        console.print(printable(f"note: {n}"), markup=False)
    if not a.quiet:
        console.print(printable(w.summary), markup=False)
    return 0


def converter_main(name: str):
    """``f(argv) -> exit code`` for one converter, as if called as ``ckdiff convert NAME argv...``."""
    return lambda argv: run([name, *argv])


COMMANDS = {name: converter_main(name) for name in CONVERTERS}
