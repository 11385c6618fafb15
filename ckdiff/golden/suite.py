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

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ckdiff.compare.status import ok_text, tally  # noqa: F401 (ok_text: the suite's word for a check)

from ckdiff.models import families


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


# options key of a progress_factory (commands/common.py) for the built-in converters; never shown as an option
PROGRESS = "progress_factory"


def _hf_to_megatron(src, out, o, faults=None):
    from ckdiff.convert import api
    ck, cfg = api.read_source(src)
    fam = families.family(cfg.family)
    model = o.get("model") or fam.default_megatron_model(cfg.hf_model_type)
    if ck.format == "meta" and not fam.megatron_model(model).meta_source:
        model = fam.default_megatron_model()  # Meta weights are read as the family's default source
    api.hf_to_megatron(model, out, model_path=src, tp=o.get("tp", 1), pp=o.get("pp", 1), overwrite=True,
                       make_vocab_size_divisible_by=o.get("pad") or None, true_vocab_size=o.get("true_vocab_size"),
                       progress_factory=o.get(PROGRESS), faults=faults)


def _megatron_to_hf(src, out, o, faults=None):
    from ckdiff.convert import api
    api.megatron_to_hf(src, out, overwrite=True, true_vocab_size=o.get("true_vocab_size"),
                       progress_factory=o.get(PROGRESS), faults=faults)


def _js_name(src) -> str:
    from ckdiff.convert.api import read_source
    fam = read_source(src)[1].family
    return "llama-2" if fam == "llama" else fam


def _to_jetstream(src, out, o, faults=None):
    from ckdiff.convert import api
    api.to_jetstream(o.get("model_name") or _js_name(src), src, out, overwrite=True,
                     quantize_weights=bool(o.get("quantize")), quantize_type=o.get("quantize") or "int8_per_channel",
                     progress_factory=o.get(PROGRESS), faults=faults)


def _jetstream_to_hf(src, out, o, faults=None):
    from ckdiff.convert import api
    api.jetstream_to_hf(src, out, overwrite=True, progress_factory=o.get(PROGRESS), faults=faults)


REGISTRY: dict[str, Converter] = {}


def register(c: Converter) -> Converter:
    REGISTRY[c.name] = c
    return c


register(Converter("hf-to-megatron", "hf", "megatron", _hf_to_megatron, "megatron-to-hf", "emit",
                   ("llama-gqa", "mistral-gqa", "llama-mha-tied", "falcon-7b", "falcon-40b")))
register(Converter("megatron-to-hf", "megatron", "hf", _megatron_to_hf, "hf-to-megatron", "emit",
                   ("llama-gqa", "mistral-gqa", "falcon-40b")))
register(Converter("to-jetstream", "hf", "jetstream", _to_jetstream, "jetstream-to-hf", "meta",
                   ("llama-gqa", "llama-mha-tied", "llama-mqa-hd", "llama-wide", "gemma", "mixtral")))
register(Converter("jetstream-to-hf", "jetstream", "hf", _jetstream_to_hf, "to-jetstream", "emit",
                   ("llama-gqa", "llama-spec")))


def convert(name, src, out, options: Optional[dict] = None, faults=None, registry: Optional[dict] = None) -> Path:
    """Run converter ``name`` (or a Converter) in-process. ``faults`` (convert/faults.py) reaches only
    built-in converters, whose ``run`` takes it; ``registry`` resolves names (default: REGISTRY)."""
    c = name if isinstance(name, Converter) else (registry or REGISTRY)[name]
    opts = {**c.options, **(options or {})}
    if faults is None:
        c.run(str(src), str(out), opts)
    else:
        c.run(str(src), str(out), opts, faults=faults)
    return Path(out)


@dataclass
class CheckResult:
    converter: str
    model: str
    check: str  # roundtrip | golden | logits
    ok: Optional[bool]  # None: skipped (a logit check whose noise floor leaves it nothing to judge)
    detail: str
    result: Optional[dict] = None
    variant: str = ""  # the converter options, e.g. "tp=2 pp=2" or "quantize=int8_per_channel"
    command: str = ""  # the ckdiff command that reproduces this check's comparison


def logits_ok(lr) -> Optional[bool]:
    """A logits check's outcome in a suite: None (skipped) when the verdict is inconclusive."""
    return None if lr.verdict() == "inconclusive" else lr.equivalent


@dataclass
class SuiteResult:
    checks: list
    mapping: list = field(default_factory=list)

    @property
    def equivalent(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    def tally(self) -> str:
        """``5/6 checks passed`` (``, 1 skipped`` when any was)."""
        return tally(self.checks)

    def verdict(self) -> str:
        return "pass" if self.equivalent else "fail"

    def to_dict(self) -> dict:
        return {"verdict": self.verdict(), "checks": [asdict(c) for c in self.checks], "mapping": self.mapping}


def mapping_rows(c: Converter, src) -> list:
    """The conversion table a built-in converter applies to ``src`` (first layer shown), for reports."""
    from ckdiff.convert.api import read_source
    from ckdiff.formats.layouts import convert as layout_convert
    from ckdiff.tensor.table import Plan
    try:
        ck, cfg = read_source(str(src))
        plan = Plan()
        layout_convert(ck.tensors, ck.format if ck.format != "file" else c.source, c.target, cfg, plan=plan)
        return plan.rows
    except Exception:  # noqa: BLE001 - a report without a mapping table is still a report
        return []


def _compare(a, b, progress_factory=None, **kw):
    """Converters must keep dtypes: a cast counts as a mismatch here."""
    from ckdiff.compare.diff import Options, compare_checkpoints
    from ckdiff.formats.readers import open_checkpoint
    kw.setdefault("strict_dtype", True)
    return compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)), Options(**kw),
                               progress_factory=progress_factory)


def _guard(conv, model, check, fn) -> "CheckResult":
    """Run one check; an error (a converter refusing, a missing tensor) fails that check."""
    from ckdiff.errors import CkdiffError
    try:
        return fn()
    except (CkdiffError, ValueError, RuntimeError, KeyError) as e:
        return CheckResult(conv, model, check, False, f"error: {str(e).splitlines()[0][:200]}")


def _summary(res) -> str:
    """One check's detail: the worst tensors (or the counts), then every reason the pair fails beyond
    its tensors (config differences, findings, unaccounted tensors)."""
    bad = [t for t in res.worst_first() if not t.ok]
    head = ", ".join(f"{t.name}: {t.status}" + (f" ({'; '.join(t.diagnosis)})" if t.diagnosis else "")
                     for t in bad[:3]) + (f" (+{len(bad) - 3} more tensors)" if len(bad) > 3 else "")
    return "; ".join([head or f"{len(res.tensors)} tensors: {res.counts_text()}", *res.reasons()])


def _cmd(*argv) -> str:
    """A shell line that reproduces a comparison."""
    import shlex
    return "ckdiff " + " ".join(shlex.quote(str(a)) for a in argv)


def config_drift(a, b) -> list:
    """Architecture fields (as read into ModelConfig) that differ between two checkpoints.

    Compared after parsing, not as raw JSON, so equivalent spellings (``rope_theta`` vs transformers
    v5's ``rope_parameters``) do not count, while a defaulted rope_theta or eps does."""
    from ckdiff.convert.api import read_source
    ca, cb = read_source(str(a))[1].to_dict(), read_source(str(b))[1].to_dict()
    skip = {"dtype"}
    unsaid = {"bos_token_id", "eos_token_id", "pad_token_id"}  # a layout that does not record them says nothing
    return [f"{k}: {ca[k]!r} -> {cb[k]!r}" for k in ca if k not in skip and ca[k] != cb.get(k)
            and not (k in unsaid and (ca[k] is None or cb.get(k) is None))]


def validate(c: Converter, registry: Optional[dict] = None) -> list[str]:
    """Problems that fail a converter before it runs: no inverse in ``registry`` (default REGISTRY), no golden."""
    reg = registry if registry is not None else REGISTRY
    problems = []
    if not c.inverse or c.inverse not in reg:
        problems.append(f"{c.name}: no registered inverse")
    elif reg[c.inverse].source != c.target or reg[c.inverse].target != c.source:
        problems.append(f"{c.name}: inverse {c.inverse} does not map {c.target} back to {c.source}")
    if c.golden is None:
        problems.append(f"{c.name}: no golden path")
    return problems


def golden_for(c: Converter, model: str, work: Path, dtype="float32", options=None, faults=None) -> Path:
    """The golden target for converter ``c`` on tiny ``model``."""
    from ckdiff.golden.emit import emit, padded_rows
    from ckdiff.golden.models import tiny_config
    options = options or {}
    # Meta releases exist for the Llama family only: other families take the independent emitter
    if c.golden == "emit" or (c.golden == "meta" and not families.family(tiny_config(model).family).jetstream_from_meta):
        # written by the emitter at the converter's own TP/PP and padding, with its own split rules:
        # the reader merges both the same way, so a split that differs from the spec shows
        tp, pp = options.get("tp", 1), options.get("pp", 1)
        rows = padded_rows(tiny_config(model).vocab, tp, options.get("pad")) if c.target == "megatron" else 0
        return emit(work / f"golden-{c.target}", model, c.target, dtype, tp=tp, pp=pp, vocab_rows=rows)
    # a supported path: the same converter from another source layout (the JetStream guide's workflow)
    kv = tiny_config(model).kv_heads
    shards = 12 if c.golden == "meta" and kv % 12 == 0 else (2 if c.golden == "meta" and kv % 2 == 0 else 1)
    src = emit(work / f"golden-src-{c.golden}", model, c.golden, dtype, shards=shards)
    return convert(c, src, work / f"golden-{c.target}", options, faults)


def check_converter(name: str, model: str, work: Path, dtype: str = "float32", options=None,
                    logits: bool = True, converter: Optional[Converter] = None, faults=None,
                    registry: Optional[dict] = None) -> list[CheckResult]:
    """Round trip, golden diff and logits for one converter on one tiny model.

    ``faults`` (convert/faults.py) is passed to the converter and its inverse (the mutation
    self-test); ``registry`` (default REGISTRY) resolves ``name`` and the inverse."""
    from ckdiff.compare.logits import compare_logits
    from ckdiff.formats.readers import open_checkpoint
    from ckdiff.golden.emit import emit
    reg = registry if registry is not None else REGISTRY
    c = converter or reg[name]
    options = options or {}
    out: list[CheckResult] = []
    problems = validate(c, reg)
    if problems:
        return [CheckResult(c.name, model, "registry", False, "; ".join(problems))]
    work.mkdir(parents=True, exist_ok=True)
    src = emit(work / f"src-{c.source}", model, c.source, dtype, tp=options.get("tp", 1), pp=options.get("pp", 1))
    tgt = work / f"out-{c.target}"
    try:
        convert(c, src, tgt, options, faults)
    except Exception as e:  # noqa: BLE001 - a converter that fails is a failed check, never a crash
        return [CheckResult(c.name, model, "convert", False, f"error: {str(e).splitlines()[0][:200]}")]
    inv_opts = {k: v for k, v in options.items() if k != "quantize"}
    held: dict = {}  # the golden diff and logit results, for the cross-check notes

    def roundtrip():
        if options.get("quantize"):
            # lossy: every element of the quantized output within its scale bound of the float weights
            flt = emit(work / "float-jetstream", model, "jetstream", dtype)
            rt = _compare(flt, tgt)
            return CheckResult(c.name, model, "roundtrip", rt.equivalent,
                               "quantized vs float, in units of each scale: " + _summary(rt), rt.to_dict(),
                               command=_cmd(flt, tgt, "--strict-dtype"))
        back = convert(c.inverse, tgt, work / f"back-{c.source}", inv_opts, faults, reg)
        rt = _compare(src, back)
        drift = config_drift(src, back)
        detail = _summary(rt) + (f"; config drift: {', '.join(drift)}" if drift else "")
        return CheckResult(c.name, model, "roundtrip", rt.equivalent and not drift, detail, rt.to_dict(),
                           command=_cmd(src, back, "--strict-dtype"))

    def golden():
        gold = golden_for(c, model, work, dtype, options, faults)
        gd = held["golden"] = _compare(gold, tgt)
        return CheckResult(c.name, model, "golden", gd.equivalent, _summary(gd), gd.to_dict(),
                           command=_cmd(gold, tgt, "--strict-dtype"))

    def logit_check():
        lr = held["logits"] = compare_logits(open_checkpoint(str(src)), open_checkpoint(str(tgt)), batch=2,
                                             length=40, dtype="float32")
        return CheckResult(c.name, model, "logits", logits_ok(lr), lr.summary(), lr.to_dict(),
                           command=_cmd("logits", src, tgt, "--batch", 2, "--length", 40))

    out.append(_guard(c.name, model, "roundtrip", roundtrip))
    out.append(_guard(c.name, model, "golden", golden))
    if logits:
        out.append(_guard(c.name, model, "logits", logit_check))
    if "golden" in held and "logits" in held:  # a difference only one check sees is named in the other
        from ckdiff.compare.logits import cross_check_notes
        cross_check_notes(held["golden"], held["logits"])
        for r in out:
            if r.check in ("golden", "logits") and r.result is not None:
                r.result = held[r.check].to_dict()
    variant = " ".join(f"{k}={v}" for k, v in options.items())
    for r in out:
        r.variant = variant
    return out


# ---------------------------------------------------------------- demo, roundtrip, golden on user input
def demo_plan(quick: bool = False) -> list:
    """(converter, tiny model, options) for every converter and model, plus TP/PP and quantized variants."""
    plan = []
    for c in REGISTRY.values():
        for m in (c.models[:1] if quick else c.models):
            plan.append((c.name, m, {}))
    return plan + [("hf-to-megatron", "llama-gqa", {"tp": 2, "pp": 2}),
                   ("to-jetstream", "llama-gqa", {"quantize": "int8_per_channel"}),
                   ("to-jetstream", "llama-blockwise", {"quantize": "int4_blockwise"})]


def demo_tag(name: str, model: str, opts: dict) -> str:
    return "-".join([name, model] + [f"{k}{v}" for k, v in opts.items()])


def demo_broken(work: Path):
    """HF -> JetStream with k permuted using the query head count: the diff names it."""
    from ckdiff.compare.diff import Options, compare_checkpoints
    from ckdiff.formats.readers import open_checkpoint
    from ckdiff.tensor.ops import rope_to_half, rope_to_interleaved
    from ckdiff.io.safetensors import read_safetensors, write_safetensors
    from ckdiff.golden.emit import emit
    from ckdiff.golden.models import lazy, tiny_config
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


def variant(options: dict) -> str:
    """The options column: ``tp=2 pp=1 quantize=int8_per_channel`` (the progress hook left out)."""
    return " ".join(f"{k}={v}" for k, v in options.items()
                    if k != PROGRESS and v not in (None, "") and not (k in ("tp", "pp") and v == 1))


def roundtrip(converter: str, src, work: Path, tp: int = 1, pp: int = 1, logits: bool = True,
              options: Optional[dict] = None, progress=None) -> SuiteResult:
    """Convert ``src`` with ``converter`` and back (into ``work``); diff, config drift and logits.

    ``options``: the converter's own (``quantize``, ``model_name``, ``pad``, ``true_vocab_size``), shown in
    the options column; a quantizing conversion is checked against ``src`` in units of each scale (the way
    back dequantizes, so it cannot be bit-exact). ``progress(label)`` -> a progress_factory, or None.
    The sides are labelled by what they are (``SRC via hf-to-megatron and megatron-to-hf``), not by the
    paths of intermediates in ``work``."""
    progress = progress or (lambda label: None)
    c = REGISTRY[converter]
    opts = {"tp": tp, "pp": pp, **(options or {})}
    shown = variant(opts)
    tgt = convert(c.name, src, work / "target", {**opts, PROGRESS: progress(f"{c.name}")})
    there = f"{src} via {c.name}"
    if opts.get("quantize"):
        rt = _compare(src, tgt, progress_factory=progress("comparing"))
        rt.b = there
        checks = [CheckResult(c.name, str(src), "roundtrip", rt.equivalent,
                              "quantized vs float, in units of each scale: " + _summary(rt), rt.to_dict(),
                              variant=shown)]
    else:
        inv = {k: v for k, v in opts.items() if k not in ("quantize", "model_name", "pad")}
        if c.source == "megatron":  # back into the Megatron-LLM model the source was written for
            from ckdiff.convert.api import read_source
            inv.setdefault("model", read_source(str(src))[1].megatron_model)
        back = convert(c.inverse, tgt, work / "back", {**inv, PROGRESS: progress(f"{c.inverse}")})
        rt = _compare(src, back, progress_factory=progress("comparing"))
        rt.b = f"{src} via {c.name} and {c.inverse}"
        drift = config_drift(src, back)
        checks = [CheckResult(c.name, str(src), "roundtrip", rt.equivalent and not drift,
                              "; ".join([_summary(rt), *(["config drift: " + ", ".join(drift)] if drift else [])]),
                              rt.to_dict(), variant=shown)]
    if logits:
        from ckdiff.compare.logits import compare_logits, cross_check_notes
        from ckdiff.formats.readers import open_checkpoint
        lr = compare_logits(open_checkpoint(str(src)), open_checkpoint(str(tgt)), progress_factory=progress("running"))
        lr.b = there
        cross_check_notes(rt, lr)
        checks[0].result = rt.to_dict()
        checks.append(CheckResult(c.name, str(src), "logits", logits_ok(lr), lr.summary(), lr.to_dict(),
                                  variant=shown))
    return SuiteResult(checks, mapping_rows(c, src))


def golden_diff(converter: str, golden_src, candidate_src, work: Path, tp: int = 1, pp: int = 1,
                options: Optional[dict] = None, progress=None):
    """Convert both sources with ``converter`` (into ``work``) and diff the outputs: a CompareResult whose
    sides are labelled ``golden: SRC via CONVERTER`` and ``candidate: SRC via CONVERTER``; its options
    record the converter and its options."""
    progress = progress or (lambda label: None)
    c = REGISTRY[converter]
    opts = {"tp": tp, "pp": pp, **(options or {})}
    g = convert(c.name, golden_src, work / "golden", {**opts, PROGRESS: progress(f"golden: {c.name}")})
    n = convert(c.name, candidate_src, work / "candidate", {**opts, PROGRESS: progress(f"candidate: {c.name}")})
    res = _compare(g, n, progress_factory=progress("comparing"))
    res.a, res.b = f"golden: {golden_src} via {c.name}", f"candidate: {candidate_src} via {c.name}"
    res.options = {**res.options, "converter": c.name, "converter_options": variant(opts)}
    res.mapping = mapping_rows(c, candidate_src)
    return res


__all__ = ["REGISTRY", "Converter", "register", "check_converter"]
