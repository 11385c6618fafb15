"""``ckdiff logits A B``: the same random token ids through both checkpoints.

Each side runs in its own layout's reference runtime (golden/runtimes.py).
Metrics (verification-lessons.md section 4), all from log_softmax in float64:
per-token KL(A||B) summed over the vocabulary (max gates, mean reported, with
the location of the max); top-1 agreement; mutual top-k containment; max-abs
logit difference with (sequence, position, token id); NMSE; and the first layer
whose hidden state diverges.

Thresholds on the max per-token KL, by compute dtype (calibrated on the tiny
golden models, see README): float64 1e-9, float32 1e-6, bfloat16/float16 2e-2.
A quantized side (against a float one) uses the quantization's own threshold:
the float side is fake-quantized with the same scheme in its own layout (per-row
quantization commutes with every layout's row permutations and fusions), and the
max KL between that reference and the quantized side must stay within the float
threshold plus 2% of the KL that quantization itself causes.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from ..converters.config import DTYPE_BY_NAME
from ..converters.config import model_config as config_of
from ..converters.lazy import Checkpoint
from ..errors import UsageError

KL_THRESHOLD = {"float64": 1e-9, "float32": 1e-6, "bfloat16": 2e-2, "float16": 2e-2}
QUANT_MARGIN = 0.02  # room for a few codes that round the other way in another quantizer
HIDDEN_REL_THRESHOLD = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 5e-2, "float16": 5e-2}


@dataclass
class LogitsResult:
    a: str
    b: str
    format_a: str
    format_b: str
    dtype: str
    batch: int
    length: int
    seed: int
    vocab_compared: int
    vocab_a: int
    vocab_b: int
    max_kl: float
    mean_kl: float
    max_kl_at: list  # [sequence, position]
    top1_agreement: float
    topk: int
    topk_agreement: float
    first_topk_failure: Optional[list]
    max_abs: float
    max_abs_at: list  # [sequence, position, token id]
    nmse: float
    first_divergent_layer: Optional[int]
    layer_rel_errors: list
    threshold: float
    threshold_reason: str
    gate_kl: Optional[float] = None  # when set, the value compared with the threshold (quantized side)
    skip_first: bool = False
    notes: list = field(default_factory=list)

    @property
    def equivalent(self) -> bool:
        return (self.max_kl if self.gate_kl is None else self.gate_kl) <= self.threshold

    def verdict(self) -> str:
        return "equivalent" if self.equivalent else "differ"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict()
        return d


def random_ids(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def _lockstep(ga, gb) -> tuple:
    """Run both sides' layer generators in step: A's layer i, then B's layer i, each holding one layer's
    weights. Returns (logits A, logits B, relative hidden-state error per layer); only these per-layer
    summaries are kept, not the activations. The list is empty when the layer counts differ."""
    rel, out, alive = [], [None, None], [True, True]
    for_both = True
    while any(alive):
        hs = []
        for j, g in enumerate((ga, gb)):
            h = None
            if alive[j]:
                try:
                    h = next(g)
                except StopIteration as stop:
                    alive[j], out[j] = False, stop.value
            hs.append(h)
        if hs[0] is not None and hs[1] is not None:
            ha, hb = hs[0].double(), hs[1].double()
            rel.append(float((ha - hb).norm() / ha.norm().clamp(min=1e-30)))
        elif hs[0] is not None or hs[1] is not None:
            for_both = False
        del hs
    return out[0], out[1], rel if for_both else []


def compare_logits(a: Checkpoint, b: Checkpoint, batch: int = 4, length: int = 48, seed: int = 0,
                   dtype: str = "float32", topk: int = 5, skip_first: bool = False,
                   threshold: Optional[float] = None, progress_factory=None) -> LogitsResult:
    from ..converters.quant import fake_quantize, is_quantized, qtype_of
    from ..golden.runtimes import drain, steps
    if length < 2:
        raise UsageError("--length must be >= 2: a 1-token prompt cannot show a rotary bug")
    if dtype not in DTYPE_BY_NAME:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPE_BY_NAME)}")
    ca, cb = config_of(a), config_of(b)
    true_a = ca.extra.get("true_vocab_size") or ca.vocab
    true_b = cb.extra.get("true_vocab_size") or cb.vocab
    vocab = min(true_a, true_b)
    ids = random_ids(vocab, batch, length, seed)
    tdt = DTYPE_BY_NAME[dtype]
    hthr = HIDDEN_REL_THRESHOLD[dtype]
    qa, qb = is_quantized(a.tensors), is_quantized(b.tensors)
    total = a.num_bytes + b.num_bytes + ((b.num_bytes if qa else a.num_bytes) if qa != qb else 0)
    progress = progress_factory(total) if progress_factory else None
    with torch.no_grad():
        logits_a, logits_b, rel_errors = _lockstep(steps(a, ca, ids, tdt, progress), steps(b, cb, ids, tdt, progress))
    first_div = next((i for i, r in enumerate(rel_errors) if r > hthr), None)
    la, lb = logits_a[..., :vocab].double(), logits_b[..., :vocab].double()
    if skip_first:
        la, lb = la[:, 1:], lb[:, 1:]
    lpa, lpb = torch.log_softmax(la, -1), torch.log_softmax(lb, -1)
    kl = (lpa.exp() * (lpa - lpb)).sum(-1)  # [B, T]: summed over the vocabulary, never averaged
    kmax, kidx = kl.reshape(-1).max(0)
    T = la.shape[1]
    top1 = (la.argmax(-1) == lb.argmax(-1)).double().mean()
    k = min(topk, vocab)
    ta, tb = la.topk(k, -1).indices, lb.topk(k, -1).indices
    a_in_b = (tb == la.argmax(-1, keepdim=True)).any(-1)
    b_in_a = (ta == lb.argmax(-1, keepdim=True)).any(-1)
    mutual = a_in_b & b_in_a
    fail = (~mutual).nonzero()
    diff = (la - lb).abs()
    dmax, didx = diff.reshape(-1).max(0)
    di = int(didx)
    nmse = float(((la - lb) ** 2).mean() / la.var()) if la.var() > 0 else 0.0
    notes = []
    thr, reason = KL_THRESHOLD[dtype], f"max per-token KL for {dtype} compute"
    gate_kl = None
    if qa != qb:
        # The quantization's own threshold: the KL that a correct quantization of the float side
        # reaches, measured by fake-quantizing the float side in its own layout.
        fl, cf, qu = (b, cb, a) if qa else (a, ca, b)
        qtype = qtype_of(qu.config or {}, qu.tensors)
        ref_ck = Checkpoint(fl.path, fl.format, fake_quantize(fl.tensors, qtype), fl.config, fl.meta)
        with torch.no_grad():
            fr = drain(steps(ref_ck, cf, ids, tdt, progress))
        lr = torch.log_softmax(fr[..., :vocab].double()[:, int(skip_first):], -1)
        lpf, lpq = (lpb, lpa) if qa else (lpa, lpb)
        ref_kl = float((lpf.exp() * (lpf - lr)).sum(-1).max())
        gate_kl = float((lr.exp() * (lr - lpq)).sum(-1).max())
        thr = thr + QUANT_MARGIN * ref_kl
        reason = (f"{qtype}: KL from a reference quantization of the float side <= {dtype} threshold "
                  f"+ {QUANT_MARGIN} x its own KL ({ref_kl:.3g})")
        notes.append(f"{'A' if qa else 'B'} is quantized ({qtype}): quantization alone reaches max KL {ref_kl:.4g}; "
                     f"the quantized side is {gate_kl:.3g} from the reference quantization (this value gates)")
    if progress is not None and hasattr(progress, "stop"):
        progress.stop()
    if threshold is not None:
        thr, reason = threshold, "--threshold"
    if dtype in ("bfloat16", "float16") and "mixtral" in (ca.family, cb.family):
        notes.append("MoE routing in 16-bit compute: rounding can pick different experts for near ties; "
                     "prefer --dtype float32 for a verdict")
    if vocab < max(ca.vocab, cb.vocab):
        notes.append(f"compared the first {vocab} vocab entries (A has {ca.vocab} rows, B {cb.vocab})")
    if (ca.rope_theta, ca.norm_eps) != (cb.rope_theta, cb.norm_eps):
        notes.append(f"configs differ: rope_theta {ca.rope_theta} vs {cb.rope_theta}, "
                     f"norm eps {ca.norm_eps} vs {cb.norm_eps}")
    kpos = int(kidx)
    return LogitsResult(
        a=a.path, b=b.path, format_a=a.format, format_b=b.format, dtype=dtype, batch=batch, length=length,
        seed=seed, vocab_compared=vocab, vocab_a=ca.vocab, vocab_b=cb.vocab, max_kl=float(kmax),
        mean_kl=float(kl.mean()), max_kl_at=[kpos // T, kpos % T + int(skip_first)],
        top1_agreement=float(top1), topk=k, topk_agreement=float(mutual.double().mean()),
        first_topk_failure=[int(fail[0, 0]), int(fail[0, 1]) + int(skip_first)] if len(fail) else None,
        max_abs=float(dmax), max_abs_at=[di // (T * vocab), (di // vocab) % T + int(skip_first), di % vocab],
        nmse=nmse, first_divergent_layer=first_div, layer_rel_errors=rel_errors, threshold=thr,
        threshold_reason=reason, gate_kl=gate_kl, skip_first=skip_first, notes=notes)


def print_logits(res: LogitsResult, console) -> None:
    from rich.markup import escape

    from ..reports.render import fmt
    style = "bold green" if res.equivalent else "bold red"
    what = "max per-token KL" if res.gate_kl is None else "max per-token KL from the reference quantization"
    val = res.max_kl if res.gate_kl is None else res.gate_kl
    console.print(f"[{style}]{'EQUIVALENT' if res.equivalent else 'DIFFER'}[/{style}]: {what} "
                  f"{fmt(val)} (threshold {fmt(res.threshold)}, {escape(res.threshold_reason)})")
    console.print(escape(f"A: {res.a} [{res.format_a}]\nB: {res.b} [{res.format_b}]"))
    console.print(f"tokens: {res.batch} x {res.length} (seed {res.seed}), compute {res.dtype}, vocab {res.vocab_compared}")
    console.print(escape(f"KL max {fmt(res.max_kl)} at [seq, pos] {res.max_kl_at}, mean {fmt(res.mean_kl)}"))
    console.print(f"top-1 agreement {res.top1_agreement:.4f}; mutual top-{res.topk} {res.topk_agreement:.4f}"
                  + (escape(f" (first failure at {res.first_topk_failure})") if res.first_topk_failure else ""))
    console.print(escape(f"max |logit diff| {fmt(res.max_abs)} at [seq, pos, token] {res.max_abs_at}; NMSE {fmt(res.nmse)}"))
    if res.layer_rel_errors:
        div = "none" if res.first_divergent_layer is None else str(res.first_divergent_layer)
        console.print(f"first divergent layer: {div} (relative hidden-state error per layer: "
                      + ", ".join(fmt(x, 2) for x in res.layer_rel_errors) + ")")
    for n in res.notes:
        console.print(escape(f"note: {n}"))


def cmd_logits(argv) -> int:
    from ..cli import _console, _progress_factory, add_common, add_report_args, check_report_paths, emit_reports
    from ..converters.formats import open_checkpoint

    class P(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(f"ckdiff logits: {message}")
    p = P(prog="ckdiff logits", description="Compare two checkpoints by forward passes in their own layouts.")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--format-a")
    p.add_argument("--format-b")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--length", type=int, default=48, help="positions per sequence (>= 32 recommended)")
    p.add_argument("--batch", type=int, default=4, help="number of sequences")
    p.add_argument("--dtype", default="float32", help="compute dtype: float64, float32, bfloat16, float16")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--skip-first-token", action="store_true")
    p.add_argument("--threshold", type=float, help="override the max per-token KL threshold")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_report_args(p)
    add_common(p)
    args = p.parse_args(argv)
    a = open_checkpoint(args.a, args.format_a, args.cache_dir, args.trust_pickle)
    b = open_checkpoint(args.b, args.format_b, args.cache_dir, args.trust_pickle)
    check_report_paths(args, a, b)
    res = compare_logits(a, b, args.batch, args.length, args.seed, args.dtype, args.topk,
                         args.skip_first_token, args.threshold,
                         _progress_factory(sys.stderr.isatty() and not args.quiet, "running"))
    print_logits(res, _console())
    emit_reports(args, "logits", res)
    return 0 if res.equivalent else 1
