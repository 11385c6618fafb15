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
    token_kl: list = field(default_factory=list)  # [sequence][position] per-token KL(A||B), for the report
    worst_topk: dict = field(default_factory=dict)  # top-k of A and B at the max-KL token, for the report

    @property
    def equivalent(self) -> bool:
        return (self.max_kl if self.gate_kl is None else self.gate_kl) <= self.threshold

    def verdict(self) -> str:
        return "equivalent" if self.equivalent else "differ"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict()
        return d


def random_ids(vocab: int, batch: int, length: int, seed: int, bos: Optional[int] = None,
               special: tuple = ()) -> torch.Tensor:
    """Random token ids; with ``bos``, every sequence starts with it, and each id of ``special`` appears
    in every sequence at a seeded position after it, so a shifted or missing special-token row shows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    if bos is not None and 0 <= bos < vocab:
        ids[:, 0] = bos
    spec = [t for t in special if isinstance(t, int) and 0 <= t < vocab]
    if spec and length > 1 + len(spec):
        for row in range(batch):
            pos = torch.randperm(length - 1, generator=g)[:len(spec)] + 1
            ids[row, pos] = torch.tensor(spec)
    return ids


def special_ids(a: Checkpoint, b: Checkpoint) -> tuple[Optional[int], tuple]:
    """(BOS id, other special ids) from either side's canonical config (HF config.json carries them)."""
    from ..converters.config import canonical_config
    bos, other = None, []
    for ck in (a, b):
        try:
            c = canonical_config(ck.format, ck.config, ck.tensors) or {}
        except (TypeError, ValueError, KeyError, ZeroDivisionError):
            c = {}
        if bos is None and isinstance(c.get("bos_token_id"), int):
            bos = c["bos_token_id"]
        for k in ("eos_token_id", "pad_token_id"):
            v = c.get(k)
            for t in (v if isinstance(v, list) else [v]):
                if isinstance(t, int) and t not in other and t != bos:
                    other.append(t)
    return bos, tuple(other)


WEIGHT_PRECISION = ["float8_e5m2", "float8_e4m3fn", "bfloat16", "float16", "float32", "float64"]


def weight_dtype(ck: Checkpoint) -> Optional[str]:
    """The least precise float dtype among a checkpoint's weights (quantization scales aside)."""
    seen = {str(t.dtype).replace("torch.", "") for k, t in ck.tensors.items()
            if t.dtype.is_floating_point and not k.endswith("_scaler")}
    seen &= set(WEIGHT_PRECISION)
    return min(seen, key=WEIGHT_PRECISION.index) if seen else None


def weight_threshold(dtype: str, a: Checkpoint, b: Checkpoint) -> tuple[float, str]:
    """The KL threshold follows the precision of the weights, not only the compute dtype: a 16-bit side
    computed in float32 carries 16-bit rounding and is judged by the 16-bit threshold."""
    wa, wb = weight_dtype(a), weight_dtype(b)
    low = min((w for w in (wa, wb) if w), key=WEIGHT_PRECISION.index, default=None)
    if low and WEIGHT_PRECISION.index(low) < WEIGHT_PRECISION.index(dtype) and low in KL_THRESHOLD:
        side = " and ".join(s for s, w in (("A", wa), ("B", wb)) if w == low)
        return KL_THRESHOLD[low], (f"max per-token KL for {low} weights ({side}), computed in {dtype}: the "
                                   f"{low} threshold applies, since the weights carry {low} rounding")
    return KL_THRESHOLD[dtype], f"max per-token KL for {dtype} compute"


def cross_check_notes(diff_result, logits_result) -> None:
    """Say so in each report when only one of the two checks sees a difference (in place).

    A bug below the logit threshold (a norm x 1.001, padding rows, a bias the runtime ignores) is named
    in the logit report as "seen by the tensor diff only"; a config-only bug that the tensors cannot show
    is named in the diff report as "seen by the logit check only"."""
    if diff_result is None or logits_result is None:
        return
    if not diff_result.equivalent and logits_result.equivalent:
        bad = [t for t in diff_result.worst_first() if not t.ok][:3]
        what = ", ".join(f"{t.name} ({t.diagnosis[0] if t.diagnosis else t.status})" for t in bad) or \
            ", ".join(str(c[0]) for c in diff_result.config_diff)
        logits_result.notes.append(f"seen by the tensor diff only: {what}; its effect on these logits stays "
                                   f"under the threshold {logits_result.threshold:.3g}")
    elif diff_result.equivalent and not logits_result.equivalent:
        diff_result.notes.append(f"seen by the logit check only: max per-token KL {logits_result.max_kl:.3g} "
                                 f"> {logits_result.threshold:.3g} while every tensor and config field agrees "
                                 "(a difference the runtime introduces, or one outside the compared tensors)")


def _is_moe(cfg) -> bool:
    from ..families import FAMILIES, Mlp
    f = FAMILIES.get(cfg.family)
    return f is not None and f.block.mlp is Mlp.MOE


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


def _encoding_name(ck: Checkpoint) -> str:
    """The encodings of a checkpoint's block-scaled views, for notes."""
    from ..tensor.blockscaled import BlockScaled
    return ", ".join(sorted({t.encoding for t in ck.tensors.values() if isinstance(t, BlockScaled)}))


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
    true_a = ca.true_vocab or ca.vocab
    true_b = cb.true_vocab or cb.vocab
    vocab = min(true_a, true_b)
    bos, spec = special_ids(a, b)
    ids = random_ids(vocab, batch, length, seed, bos, spec)
    tdt = DTYPE_BY_NAME[dtype]
    hthr = HIDDEN_REL_THRESHOLD[dtype]
    qa, qb = is_quantized(a.tensors), is_quantized(b.tensors)
    ref_tensors = None
    if not (qa or qb):  # another encoding (FP8, compressed-tensors) under the float side's own names
        from ..tensor.blockscaled import reencoded
        ra, rb = reencoded(b.tensors, a.tensors), reencoded(a.tensors, b.tensors)
        if (ra is None) != (rb is None):
            qa, qb, ref_tensors = ra is not None, rb is not None, ra if ra is not None else rb
    total = a.num_bytes + b.num_bytes + ((b.num_bytes if qa else a.num_bytes) if qa != qb else 0)
    progress = progress_factory(total) if progress_factory else None
    with torch.no_grad():
        logits_a, logits_b, rel_errors = _lockstep(steps(a, ca, ids, tdt, progress), steps(b, cb, ids, tdt, progress))
    first_div = next((i for i, r in enumerate(rel_errors) if r > hthr), None)
    notes = []
    if bos is not None or spec:
        notes.append(f"prompts: BOS {bos} at position 0" + (f", special ids {list(spec)} inside every sequence"
                                                             if spec else ""))
    thr, reason = weight_threshold(dtype, a, b)
    fr = qtype = None
    if qa != qb:
        # The quantization's own threshold: the KL that a correct quantization of the float side
        # reaches, measured by fake-quantizing the float side in its own layout.
        fl, cf, qu = (b, cb, a) if qa else (a, ca, b)
        if ref_tensors is not None:
            qtype = _encoding_name(qu)
        else:
            qtype = qtype_of(qu.config or {}, qu.tensors)
            ref_tensors = fake_quantize(fl.tensors, qtype)
        ref_ck = Checkpoint(fl.path, fl.format, ref_tensors, fl.config, fl.meta)
        with torch.no_grad():
            fr = drain(steps(ref_ck, cf, ids, tdt, progress))
    m = logit_metrics(logits_a, logits_b, vocab, topk, skip_first, ref=fr, quantized_a=qa)
    del logits_a, logits_b, fr
    gate_kl = m.gate_kl
    if qa != qb:
        ref_kl = m.ref_kl
        thr = thr + QUANT_MARGIN * ref_kl
        reason = (f"{qtype}: KL from a reference quantization of the float side <= {dtype} threshold "
                  f"+ {QUANT_MARGIN} x its own KL ({ref_kl:.3g})")
        notes.append(f"{'A' if qa else 'B'} is quantized ({qtype}): quantization alone reaches max KL {ref_kl:.4g}; "
                     f"the quantized side is {gate_kl:.3g} from the reference quantization (this value gates)")
    if progress is not None and hasattr(progress, "stop"):
        progress.stop()
    if threshold is not None:
        thr, reason = threshold, "--threshold"
    if dtype in ("bfloat16", "float16") and any(_is_moe(c) for c in (ca, cb)):
        notes.append("MoE routing in 16-bit compute: rounding can pick different experts for near ties; "
                     "prefer --dtype float32 for a verdict")
    if vocab < max(ca.vocab, cb.vocab):
        notes.append(f"compared the first {vocab} vocab entries (A has {ca.vocab} rows, B {cb.vocab})")
    if (ca.rope_theta, ca.norm_eps) != (cb.rope_theta, cb.norm_eps):
        notes.append(f"configs differ: rope_theta {ca.rope_theta} vs {cb.rope_theta}, "
                     f"norm eps {ca.norm_eps} vs {cb.norm_eps}")
    sk = int(skip_first)
    return LogitsResult(
        a=a.path, b=b.path, format_a=a.format, format_b=b.format, dtype=dtype, batch=batch, length=length,
        seed=seed, vocab_compared=vocab, vocab_a=ca.vocab, vocab_b=cb.vocab, max_kl=m.max_kl,
        mean_kl=m.mean_kl, max_kl_at=[m.max_kl_at[0], m.max_kl_at[1] + sk],
        top1_agreement=m.top1_agreement, topk=m.topk, topk_agreement=m.topk_agreement,
        first_topk_failure=None if m.first_topk_failure is None else
        [m.first_topk_failure[0], m.first_topk_failure[1] + sk],
        max_abs=m.max_abs, max_abs_at=[m.max_abs_at[0], m.max_abs_at[1] + sk, m.max_abs_at[2]],
        nmse=m.nmse, first_divergent_layer=first_div, layer_rel_errors=rel_errors, threshold=thr,
        threshold_reason=reason, gate_kl=gate_kl, skip_first=skip_first, notes=notes,
        token_kl=[[float(f"{x:.4g}") for x in row] for row in m.kl.tolist()], worst_topk=m.worst_topk)


# ---------------------------------------------------------------- the metrics, a block of positions at a time
METRIC_BLOCK_BYTES = 8 << 20  # float64 [positions, vocab] per temporary; a handful are alive at once


@dataclass
class LogitMetrics:
    """Metrics of two [B, T, V] logit tensors (positions counted after ``skip_first``)."""
    kl: torch.Tensor  # [B, T] float64: per-token KL(A||B) summed over the vocabulary
    max_kl: float
    mean_kl: float
    max_kl_at: list  # [sequence, position]
    top1_agreement: float
    topk: int
    topk_agreement: float
    first_topk_failure: Optional[list]  # [sequence, position]
    max_abs: float
    max_abs_at: list  # [sequence, position, token id]
    nmse: float
    worst_topk: dict  # top-k of A and B at the max-KL token
    ref_kl: Optional[float] = None  # with ``ref``: max KL(float side || reference quantization)
    gate_kl: Optional[float] = None  # with ``ref``: max KL(reference quantization || quantized side)


def _rows(logits: torch.Tensor, b: int, lo: int, hi: int, vocab: int) -> torch.Tensor:
    """Positions [lo, hi) of sequence ``b``, the first ``vocab`` entries, in float64."""
    return logits[b, lo:hi, :vocab].double()


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Per-row KL(P||Q) from log-probabilities, summed over the vocabulary."""
    e = lp.exp()
    return e.mul_(lp - lq).sum(-1)


def logit_metrics(logits_a: torch.Tensor, logits_b: torch.Tensor, vocab: int, topk: int = 5,
                  skip_first: bool = False, ref: Optional[torch.Tensor] = None,
                  quantized_a: bool = False) -> LogitMetrics:
    """The logit metrics, all in float64 from log_softmax, computed a block of positions of one sequence
    at a time: only one block's float64 [positions, vocab] temporaries are alive, whatever the batch.

    Every row-wise value (log_softmax, KL, argmax, top-k) is the whole-batch computation's own; the
    maxima combine exactly (first occurrence, NaN first, as ``Tensor.max``); means over [B, T] are taken
    over the whole [B, T] results. NMSE's sums over [B, T, V] combine by blocks (mean square, and the
    variance with Chan's pairwise update), so it agrees with one whole-tensor reduction to rounding.
    ``ref`` (a reference quantization of the float side) adds ``ref_kl`` and ``gate_kl``; the quantized
    side is A when ``quantized_a``."""
    B, T0 = logits_a.shape[0], logits_a.shape[1]
    sk = int(skip_first)
    T = T0 - sk
    k = min(topk, vocab)
    step = max(1, METRIC_BLOCK_BYTES // (8 * max(1, vocab)))
    kls, same1, mutual, refs, gates = [], [], [], [], []
    best = None  # (max |A - B|, flat index over [B, T, V])
    sq_sum, n, mean, m2 = 0.0, 0, 0.0, 0.0
    for b in range(B):
        for lo in range(sk, T0, step):
            hi = min(T0, lo + step)
            la, lb = _rows(logits_a, b, lo, hi, vocab), _rows(logits_b, b, lo, hi, vocab)
            ia, ib = la.argmax(-1, keepdim=True), lb.argmax(-1, keepdim=True)
            same1.append((ia == ib).reshape(-1))
            ta, tb = la.topk(k, -1).indices, lb.topk(k, -1).indices
            mutual.append((tb == ia).any(-1) & (ta == ib).any(-1))
            d = la - lb
            sq_sum += float((d * d).sum())
            dmax, didx = d.abs_().reshape(-1).max(0)
            del d
            v = float(dmax)
            if best is None or v > best[0] or (v != v and best[0] == best[0]):
                best = (v, (b * T + lo - sk) * vocab + int(didx))
            var, mu = torch.var_mean(la, correction=0)
            nb = la.numel()
            delta = float(mu) - mean
            tot = n + nb
            mean += delta * nb / tot
            m2 += float(var) * nb + delta * delta * n * nb / tot
            n = tot
            lpa = torch.log_softmax(la, -1)
            del la
            lpb = torch.log_softmax(lb, -1)
            del lb
            kls.append(_kl(lpa, lpb))
            if ref is not None:
                lr = torch.log_softmax(_rows(ref, b, lo, hi, vocab), -1)
                lpf, lpq = (lpb, lpa) if quantized_a else (lpa, lpb)
                refs.append(_kl(lpf, lr))
                gates.append(_kl(lr, lpq))
                del lr, lpf, lpq
            del lpa, lpb
    kl = torch.cat(kls).reshape(B, T)
    kmax, kidx = kl.reshape(-1).max(0)
    kpos = int(kidx)
    seq, pos = kpos // T, kpos % T
    wa = torch.log_softmax(_rows(logits_a, seq, pos + sk, pos + sk + 1, vocab), -1)[0]
    wb = torch.log_softmax(_rows(logits_b, seq, pos + sk, pos + sk + 1, vocab), -1)[0]
    worst = {"a_ids": wa.topk(k).indices.tolist(), "a_logprob": wa.topk(k).values.tolist(),
             "b_ids": wb.topk(k).indices.tolist(), "b_logprob": wb.topk(k).values.tolist()}
    mut = torch.cat(mutual).reshape(B, T)
    fail = (~mut).nonzero()
    var = m2 / (n - 1) if n > 1 else float("nan")
    di = best[1]
    return LogitMetrics(
        kl=kl, max_kl=float(kmax), mean_kl=float(kl.mean()), max_kl_at=[seq, pos],
        top1_agreement=float(torch.cat(same1).reshape(B, T).double().mean()), topk=k,
        topk_agreement=float(mut.double().mean()),
        first_topk_failure=[int(fail[0, 0]), int(fail[0, 1])] if len(fail) else None,
        max_abs=best[0], max_abs_at=[di // (T * vocab), (di // vocab) % T, di % vocab],
        nmse=sq_sum / n / var if var > 0 else 0.0, worst_topk=worst,
        ref_kl=float(torch.cat(refs).max()) if ref is not None else None,
        gate_kl=float(torch.cat(gates).max()) if ref is not None else None)
