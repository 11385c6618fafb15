"""Converter registry and the checks every converter must pass.

Each converter declares its source and target layouts, its inverse and its
golden path. ``check_converter`` runs, on one tiny golden model:
  round trip  source -> target -> inverse -> source', bit-exact (``ckdiff`` exit 0);
  golden diff target vs the golden (the independent emitter, or the supported path);
  logits      source vs target through their own reference runtimes.
A converter registered without an inverse or a golden fails the suite.
``ckdiff roundtrip`` / ``ckdiff golden`` run the same checks on a user's checkpoint,
and ``ckdiff demo`` runs everything on the built-in tiny models and writes reports.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import UsageError


@dataclass
class Converter:
    """A converter under test. ``run(src, out, options)`` writes the converted checkpoint to ``out``.

    ``inverse`` names the registered converter that maps ``target`` back to ``source``;
    ``golden`` is "emit" (the independent golden emitter writes the expected target) or a
    source layout whose conversion by this same converter is the golden (the JetStream
    guide's workflow: Meta -> JetStream is the golden for HF -> JetStream).
    """
    name: str
    source: str  # layout
    target: str
    run: Callable[[str, str, dict], None]
    inverse: Optional[str]
    golden: Optional[str]
    models: tuple = ()
    options: dict = field(default_factory=dict)


def cli_converter(argv: Callable[[str, str, dict], list]) -> Callable[[str, str, dict], None]:
    """A ``run`` callable for a built-in ``ckdiff convert`` subcommand (in-process, quiet)."""
    def run(src, out, options):
        import contextlib
        import io

        from ..converters.cli import COMMANDS
        args = [str(a) for a in argv(str(src), str(out), options or {})]
        with contextlib.redirect_stdout(io.StringIO()):
            COMMANDS[args[0]](args[1:])
    return run


def _model_name(cfg) -> str:
    if cfg.family == "falcon":
        return "falcon"
    return "mistral" if cfg.extra.get("model_type") == "mistral" else "llama2"


def _hf_to_megatron(src, out, o):
    from ..converters.cli import read_source
    ck, cfg = read_source(src)
    model = _model_name(cfg)
    if ck.format == "meta" and model == "mistral":
        model = "llama2"  # Meta weights are read as a llama-family source
    return ["hf-to-megatron", model, "--model-path", src, "--out", out, "--tp", str(o.get("tp", 1)), "--pp",
            str(o.get("pp", 1)), "--overwrite"] + (["--make-vocab-size-divisible-by", str(o["pad"])] if o.get("pad") else [])


def _js_name(src) -> str:
    from ..converters.cli import read_source
    fam = read_source(src)[1].family
    return "llama-2" if fam == "llama" else fam


REGISTRY: dict[str, Converter] = {}


def register(c: Converter) -> Converter:
    REGISTRY[c.name] = c
    return c


register(Converter("hf-to-megatron", "hf", "megatron", cli_converter(_hf_to_megatron), "megatron-to-hf", "emit",
                   ("llama-gqa", "mistral-gqa", "llama-mha-tied", "falcon-7b", "falcon-40b")))
register(Converter("megatron-to-hf", "megatron", "hf",
                   cli_converter(lambda s, o, x: ["megatron-to-hf", "--input_dir", s, "--output_dir", o, "--overwrite"]),
                   "hf-to-megatron", "emit", ("llama-gqa", "mistral-gqa", "falcon-40b")))
register(Converter("to-jetstream", "hf", "jetstream",
                   cli_converter(lambda s, o, x: ["to-jetstream", "--model_name", _js_name(s), "--input_checkpoint_dir", s,
                                                  "--output_checkpoint_dir", o, "--overwrite"]
                                 + (["--quantize_weights", "--quantize_type", x["quantize"]] if x.get("quantize") else [])),
                   "jetstream-to-hf", "meta", ("llama-gqa", "llama-mha-tied", "llama-mqa-hd", "llama-wide", "gemma",
                                               "mixtral")))
register(Converter("jetstream-to-hf", "jetstream", "hf",
                   cli_converter(lambda s, o, x: ["jetstream-to-hf", "--input_checkpoint_dir", s,
                                                  "--output_checkpoint_dir", o, "--overwrite"]),
                   "to-jetstream", "emit", ("llama-gqa", "llama-spec")))


def convert(name, src, out, options: Optional[dict] = None) -> Path:
    """Run converter ``name`` (or a Converter) in-process."""
    c = name if isinstance(name, Converter) else REGISTRY[name]
    c.run(str(src), str(out), {**c.options, **(options or {})})
    return Path(out)


@dataclass
class CheckResult:
    converter: str
    model: str
    check: str  # roundtrip | golden | logits
    ok: bool
    detail: str
    result: Optional[dict] = None
    variant: str = ""  # the converter options, e.g. "tp=2 pp=2" or "quantize=int8_per_channel"


@dataclass
class SuiteResult:
    checks: list
    mapping: list = field(default_factory=list)

    @property
    def equivalent(self) -> bool:
        return all(c.ok for c in self.checks)

    def verdict(self) -> str:
        return "pass" if self.equivalent else "fail"

    def to_dict(self) -> dict:
        return {"verdict": self.verdict(), "checks": [asdict(c) for c in self.checks], "mapping": self.mapping}


def mapping_rows(c: Converter, src) -> list:
    """The conversion table a built-in converter applies to ``src`` (first layer shown), for reports."""
    from ..converters.cli import read_source
    from ..converters.layouts import convert as layout_convert
    from ..converters.table import Plan
    try:
        ck, cfg = read_source(str(src))
        plan = Plan()
        layout_convert(ck.tensors, ck.format if ck.format != "file" else c.source, c.target, cfg, plan=plan)
        return plan.rows
    except Exception:  # noqa: BLE001 - a report without a mapping table is still a report
        return []


def _compare(a, b, **kw):
    """Converters must keep dtypes: a cast counts as a mismatch here."""
    from ..compare.diff import Options, compare_checkpoints
    from ..converters.formats import open_checkpoint
    kw.setdefault("strict_dtype", True)
    return compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)), Options(**kw))


def _guard(conv, model, check, fn) -> "CheckResult":
    """Run one check; an error (a converter refusing, a missing tensor) fails that check."""
    from ..errors import CkdiffError
    try:
        return fn()
    except (CkdiffError, ValueError, RuntimeError, KeyError) as e:
        return CheckResult(conv, model, check, False, f"error: {str(e).splitlines()[0][:200]}")


def _summary(res) -> str:
    bad = [t for t in res.worst_first() if not t.ok][:3]
    return ", ".join(f"{t.name}: {t.status}" + (f" ({t.diagnosis[0]})" if t.diagnosis else "") for t in bad) \
        or f"{len(res.tensors)} tensors, {res.counts()}"


def config_drift(a, b) -> list:
    """Architecture fields (as read into ModelConfig) that differ between two checkpoints.

    Compared after parsing, not as raw JSON, so equivalent spellings (``rope_theta`` vs transformers
    v5's ``rope_parameters``) do not count, while a defaulted rope_theta or eps does."""
    from ..converters.cli import read_source
    ca, cb = read_source(str(a))[1].to_dict(), read_source(str(b))[1].to_dict()
    skip = {"dtype", "extra"}
    return [f"{k}: {ca[k]!r} -> {cb[k]!r}" for k in ca if k not in skip and ca[k] != cb.get(k)]


def validate(c: Converter) -> list[str]:
    problems = []
    if not c.inverse or c.inverse not in REGISTRY:
        problems.append(f"{c.name}: no registered inverse")
    elif REGISTRY[c.inverse].source != c.target or REGISTRY[c.inverse].target != c.source:
        problems.append(f"{c.name}: inverse {c.inverse} does not map {c.target} back to {c.source}")
    if c.golden is None:
        problems.append(f"{c.name}: no golden path")
    return problems


def golden_for(c: Converter, model: str, work: Path, dtype="float32", options=None) -> Path:
    """The golden target for converter ``c`` on tiny ``model``."""
    from .emit import emit
    from .models import tiny_config
    options = options or {}
    # Meta releases exist for the Llama family only: other families take the independent emitter
    if c.golden == "emit" or (c.golden == "meta" and tiny_config(model).family != "llama"):
        # one unsharded golden: the reader's merged view of any TP/PP must equal it
        rows = 0
        if options.get("pad"):
            from ..converters.megatron import padded_vocab
            rows = padded_vocab(tiny_config(model).vocab, options.get("tp", 1), options["pad"])
        return emit(work / f"golden-{c.target}", model, c.target, dtype, vocab_rows=rows)
    # a supported path: the same converter from another source layout (the JetStream guide's workflow)
    kv = tiny_config(model).kv_heads
    shards = 12 if c.golden == "meta" and kv % 12 == 0 else (2 if c.golden == "meta" and kv % 2 == 0 else 1)
    src = emit(work / f"golden-src-{c.golden}", model, c.golden, dtype, shards=shards)
    return convert(c, src, work / f"golden-{c.target}", options)


def check_converter(name: str, model: str, work: Path, dtype: str = "float32", options=None,
                    logits: bool = True, converter: Optional[Converter] = None) -> list[CheckResult]:
    """Round trip, golden diff and logits for one converter on one tiny model."""
    from ..compare.logits import compare_logits
    from ..converters.formats import open_checkpoint
    from .emit import emit
    c = converter or REGISTRY[name]
    options = options or {}
    out: list[CheckResult] = []
    problems = validate(c)
    if problems:
        return [CheckResult(c.name, model, "registry", False, "; ".join(problems))]
    work.mkdir(parents=True, exist_ok=True)
    src = emit(work / f"src-{c.source}", model, c.source, dtype, tp=options.get("tp", 1), pp=options.get("pp", 1))
    tgt = work / f"out-{c.target}"
    try:
        convert(c, src, tgt, options)
    except Exception as e:  # noqa: BLE001 - a converter that fails is a failed check, never a crash
        return [CheckResult(c.name, model, "convert", False, f"error: {str(e).splitlines()[0][:200]}")]
    inv_opts = {k: v for k, v in options.items() if k != "quantize"}

    def roundtrip():
        if options.get("quantize"):
            # lossy: every element of the quantized output within its scale bound of the float weights
            flt = emit(work / "float-jetstream", model, "jetstream", dtype)
            rt = _compare(flt, tgt)
            return CheckResult(c.name, model, "roundtrip", rt.equivalent,
                               "quantized vs float, in units of each scale: " + _summary(rt), rt.to_dict())
        back = convert(c.inverse, tgt, work / f"back-{c.source}", inv_opts)
        rt = _compare(src, back)
        drift = config_drift(src, back)
        detail = _summary(rt) + (f"; config drift: {drift}" if drift else "")
        return CheckResult(c.name, model, "roundtrip", rt.equivalent and not drift, detail, rt.to_dict())

    def golden():
        gd = _compare(golden_for(c, model, work, dtype, options), tgt)
        return CheckResult(c.name, model, "golden", gd.equivalent, _summary(gd), gd.to_dict())

    def logit_check():
        lr = compare_logits(open_checkpoint(str(src)), open_checkpoint(str(tgt)), batch=2, length=40, dtype="float32")
        return CheckResult(c.name, model, "logits", lr.equivalent,
                           (f"max KL {lr.max_kl:.3g}" if lr.gate_kl is None else
                            f"KL from reference quantization {lr.gate_kl:.3g} (quantization alone {lr.max_kl:.3g})")
                           + f" (threshold {lr.threshold:.3g}), top-1 {lr.top1_agreement:.3f}", lr.to_dict())

    out.append(_guard(c.name, model, "roundtrip", roundtrip))
    out.append(_guard(c.name, model, "golden", golden))
    if logits:
        out.append(_guard(c.name, model, "logits", logit_check))
    variant = " ".join(f"{k}={v}" for k, v in options.items())
    for r in out:
        r.variant = variant
    return out


# ---------------------------------------------------------------- CLI
class _P(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _print_suite(res: SuiteResult, console):
    from rich.markup import escape
    from rich.table import Table
    ok = res.equivalent
    n_ok = sum(c.ok for c in res.checks)
    console.print(f"[{'bold green' if ok else 'bold red'}]{'PASS' if ok else 'FAIL'}[/]: "
                  f"{n_ok}/{len(res.checks)} checks passed")
    t = Table()
    for col in ("converter", "model", "options", "check", "ok", "detail"):
        t.add_column(col, overflow="fold")
    for c in res.checks:
        t.add_row(c.converter, c.model, c.variant or "-", c.check, "yes" if c.ok else "NO", escape(c.detail))
    console.print(t)


def cmd_demo(argv) -> int:
    from ..cli import _console
    from ..reports.render import write_json_report
    p = _P(prog="ckdiff demo", description="Build tiny models, convert along every path, verify, write reports.")
    p.add_argument("--out", default="ckdiff-demo", help="directory for checkpoints and reports")
    p.add_argument("--quick", action="store_true", help="one model per converter")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    console = _console()
    checks = []
    plan = []
    for c in REGISTRY.values():
        models = c.models[:1] if a.quick else c.models
        for m in models:
            plan.append((c.name, m, {}))
    plan += [("hf-to-megatron", "llama-gqa", {"tp": 2, "pp": 2}),
             ("to-jetstream", "llama-gqa", {"quantize": "int8_per_channel"}),
             ("to-jetstream", "llama-blockwise", {"quantize": "int4_blockwise"})]
    for name, model, opts in plan:
        tag = "-".join([name, model] + [f"{k}{v}" for k, v in opts.items()])
        console.print(f"checking {tag} ...")
        checks += check_converter(name, model, out / "work" / tag, options=opts)
    res = SuiteResult(checks)
    _print_suite(res, console)
    write_json_report(out / "demo.json", "demo", res.to_dict(), res.verdict())
    from ..reports import html as H
    H.write_suite(out / "demo.html", out / "demo.md", res)
    # a deliberately broken conversion, to show what a caught bug looks like
    broken = demo_broken(out / "work" / "broken")
    H.write_html(out / "broken-compare.html", "compare", broken)
    H.write_markdown(out / "broken-compare.md", "compare", broken)
    console.print(f"reports: {out / 'demo.html'}, {out / 'demo.md'}, {out / 'demo.json'}; "
                  f"a caught bug: {out / 'broken-compare.html'}")
    return 0 if res.equivalent else 1


def demo_broken(work: Path):
    """HF -> JetStream with k permuted using the query head count: the diff names it."""
    from ..compare.diff import Options, compare_checkpoints
    from ..converters.formats import open_checkpoint
    from ..converters.ops import rope_to_half, rope_to_interleaved
    from ..converters.safetensors_io import read_safetensors, write_safetensors
    from .emit import emit
    from .models import lazy, tiny_config
    cfg = tiny_config("llama-spec")  # H=4, K=2, hd=16: k as 4 heads of 8 rows is a real permutation
    gold = emit(work / "golden", "llama-spec", "jetstream")
    bad = emit(work / "candidate", "llama-spec", "jetstream")
    f = bad / "model.safetensors"
    state = {k: v.load().clone() for k, v in read_safetensors(f).items()}
    for i in range(cfg.layers):
        k = f"layers.{i}.attention.wk.weight"
        state[k] = rope_to_interleaved(rope_to_half(state[k], cfg.kv_heads, cfg.head_dim), cfg.heads,
                                       cfg.kv_rows // cfg.heads)
    f.unlink()
    write_safetensors(f, lazy(state).values())
    return compare_checkpoints(open_checkpoint(str(gold)), open_checkpoint(str(bad)), Options())


@contextlib.contextmanager
def _workdir(keep: Optional[str], prefix: str):
    """``keep`` if given (left in place), else a temporary directory removed afterwards."""
    if keep:
        yield Path(keep)
        return
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _suite_args(p, add_report_args):
    p.add_argument("--work", help="keep intermediate checkpoints here (default: a temporary directory)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size for Megatron targets")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size for Megatron targets")
    add_report_args(p)


def cmd_roundtrip(argv) -> int:
    from ..cli import _console, add_report_args, emit_reports
    p = _P(prog="ckdiff roundtrip", description="Convert SRC with CONVERTER and back; diff and compare logits.")
    p.add_argument("converter", choices=sorted(REGISTRY))
    p.add_argument("src")
    p.add_argument("--no-logits", action="store_true")
    _suite_args(p, add_report_args)
    a = p.parse_args(argv)
    c = REGISTRY[a.converter]
    with _workdir(a.work, "ckdiff-rt-") as work:
        opts = {"tp": a.tp, "pp": a.pp}
        tgt = convert(c.name, a.src, work / "target", opts)
        back = convert(c.inverse, tgt, work / "back", opts)
        rt = _compare(a.src, back)
        drift = config_drift(a.src, back)
        checks = [CheckResult(c.name, a.src, "roundtrip", rt.equivalent and not drift,
                              _summary(rt) + (f"; config drift: {drift}" if drift else ""), rt.to_dict())]
        if not a.no_logits:
            from ..compare.logits import compare_logits
            from ..converters.formats import open_checkpoint
            lr = compare_logits(open_checkpoint(a.src), open_checkpoint(str(tgt)))
            checks.append(CheckResult(c.name, a.src, "logits", lr.equivalent,
                                      f"max KL {lr.max_kl:.3g} (threshold {lr.threshold:.3g})", lr.to_dict()))
        res = SuiteResult(checks, mapping_rows(c, a.src))
    _print_suite(res, _console())
    emit_reports(a, "roundtrip", res)
    return 0 if res.equivalent else 1


def cmd_golden(argv) -> int:
    from ..cli import _console, add_report_args, emit_reports
    from ..reports.render import print_compare
    p = _P(prog="ckdiff golden",
           description="Convert GOLDEN_SRC (supported path) and CANDIDATE_SRC (new path) with CONVERTER; diff.")
    p.add_argument("converter", choices=sorted(REGISTRY))
    p.add_argument("golden_src")
    p.add_argument("candidate_src")
    _suite_args(p, add_report_args)
    a = p.parse_args(argv)
    c = REGISTRY[a.converter]
    with _workdir(a.work, "ckdiff-golden-") as work:
        opts = {"tp": a.tp, "pp": a.pp}
        g = convert(c.name, a.golden_src, work / "golden", opts)
        n = convert(c.name, a.candidate_src, work / "candidate", opts)
        res = _compare(g, n)
        res.mapping = mapping_rows(c, a.candidate_src)
    print_compare(res, _console())
    emit_reports(a, "golden", res)
    return 0 if res.equivalent else 1



__all__ = ["REGISTRY", "Converter", "register", "check_converter"]
