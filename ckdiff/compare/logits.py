"""``ckdiff logits A B``: the same random token ids through both checkpoints.

Each side runs in its own layout's reference runtime (runtime/forward.py), every encoding dequantized.
Metrics (those NeMo Automodel, llama.cpp's perplexity KLD and MaxText gate on), all from log_softmax in
float64: per-token KL(R||O) summed
over the vocabulary (mean, p99, max with its location), R being the side the noise floor encodes; top-1
agreement; mutual top-k containment; max-abs logit difference with (sequence, position, token id); NMSE;
the relative hidden-state error after each layer and the first layer past its limit.

The verdict is measured, not assumed (compare/noise.py; docs/logits.md): the lossier side's encoding
(cast, or quantize and dequantize with its scheme and block size) is applied to the other side's weights
and run in that side's runtime, which gives the noise floor of every signal; a profile (strict, standard,
relaxed) says how far above the floor each may go. The signal with the highest observed / limit ratio
decides, and is named.
"""
from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from ckdiff.models.config import DTYPE_BY_NAME
from ckdiff.models.config import model_config as config_of
from ckdiff.tensor.lazy import Checkpoint
from ckdiff.errors import UsageError

# The least top-1 agreement the noise floor may keep for the forward pass to judge a pair: below it the
# encoding alone (int4 on a small model, say) changes most predictions, a limit derived from it allows
# nearly any output, and the verdict is "inconclusive" (exit 1), never a pass with top-1 0.2.
MIN_FLOOR_TOP1 = 0.5

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
    threshold: float  # the limit on the max per-token KL (the profile's multiple of the floor, or --threshold)
    threshold_reason: str
    skip_first: bool = False
    notes: list = field(default_factory=list)
    token_kl: list = field(default_factory=list)  # [sequence][position] per-token KL(A||B), for the report
    worst_topk: dict = field(default_factory=dict)  # top-k of A and B at the max-KL token, for the report
    p99_kl: float = 0.0
    profile: str = "standard"
    kl_reference: str = "A"  # every KL is KL(this side || the other): the side the floor encodes
    encodings: dict = field(default_factory=dict)  # {"A": ..., "B": ...}
    noise_floor: dict = field(default_factory=dict)  # compare/noise.py Floor
    signals: list = field(default_factory=list)  # [{signal, observed, floor, limit, ratio}]
    deciding_signal: str = ""  # the signal with the highest observed / limit ratio
    passed: bool = True  # every signal within its limit
    tensor_diff: Optional[str] = None  # the tensor diff's verdict on the pair, when ``ckdiff logits`` ran it
    from_encoded_reference: Optional[dict] = None  # the other side against the floor run (same encoding)
    # whether the noise floor leaves the forward pass room to tell a bug from encoding noise: False when the
    # lossier side's encoding alone keeps less than MIN_FLOOR_TOP1 of the top-1 predictions at these prompts
    informative: bool = True

    @property
    def equivalent(self) -> bool:
        return self.passed and self.informative

    def verdict(self) -> str:
        if self.passed and not self.informative:
            return "inconclusive"
        return "equivalent" if self.equivalent else "differ"

    def summary(self) -> str:
        """One line: the deciding signal against its limit and floor, and top-1 against the floor's."""
        sig = next((r for r in self.signals if r["signal"] == self.deciding_signal), None)
        if sig is None:
            return f"max per-token KL {self.max_kl:.3g} (threshold {self.threshold:.3g})"
        rel = ">" if sig["ratio"] > 1 else "<="
        f1 = self.noise_floor.get("top1_agreement")
        if not all(math.isfinite(float(sig[k])) for k in ("observed", "limit")):
            return (f"non-finite logits: {sig['signal']} {sig['observed']:.3g} against limit {sig['limit']:.3g} "
                    f"(noise floor {sig['floor']:.3g}): a forward pass gave NaN or Inf, which no limit passes; "
                    f"top-1 {self.top1_agreement:.3f}")
        if self.passed and not self.informative:
            return (f"inconclusive: {self.noise_floor.get('encoding')} alone keeps top-1 {f1:.3f} of the predictions "
                    f"at these prompts (a logit check needs >= {MIN_FLOOR_TOP1}); it cannot tell a bug from the "
                    f"encoding's noise here: judge the pair by the tensor diff in scale units (top-1 "
                    f"{self.top1_agreement:.3f}, max KL {self.max_kl:.3g})")
        return (f"{sig['signal']} {sig['observed']:.3g} {rel} limit {sig['limit']:.3g} (noise floor {sig['floor']:.3g}, "
                f"{self.profile}); top-1 {self.top1_agreement:.3f} (floor {f1:.3f}), max KL {self.max_kl:.3g}")

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
    from ckdiff.models.config import canonical_config
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
        logits_result.notes.append(f"seen by the tensor diff only: {what}; the weights differ; the logits do not "
                                   f"show it at these prompts ({logits_result.deciding_signal} within "
                                   f"{logits_result.profile} limits)")
    elif diff_result.equivalent and not logits_result.equivalent:
        sig = next((r for r in logits_result.signals if r["signal"] == logits_result.deciding_signal), None)
        what = (f"{sig['signal']} {sig['observed']:.3g} > limit {sig['limit']:.3g}" if sig else
                f"max per-token KL {logits_result.max_kl:.3g}")
        diff_result.notes.append(f"seen by the logit check only: {what} while every tensor and config field agrees "
                                 "(a difference the runtime introduces, or one outside the compared tensors)")


def _is_moe(cfg) -> bool:
    from ckdiff.models.families import FAMILIES, Mlp
    f = FAMILIES.get(cfg.family)
    return f is not None and f.block.mlp is Mlp.MOE


def _lockstep(gens: list, pairs: list) -> tuple:
    """Run the layer generators in step: each one's layer i in turn, each holding one layer's weights.
    Returns (the logits of each, the relative hidden-state error per layer of each pair (i, j), relative to
    i's norm); only these per-layer summaries are kept, not the activations. A pair's list is empty when
    its layer counts differ."""
    n = len(gens)
    out, alive = [None] * n, [True] * n
    rel = [[] for _ in pairs]
    ok = [True] * len(pairs)
    while any(alive):
        hs = []
        for j, g in enumerate(gens):
            h = None
            if alive[j]:
                try:
                    h = next(g)
                except StopIteration as stop:
                    alive[j], out[j] = False, stop.value
            hs.append(h)
        for p, (i, j) in enumerate(pairs):
            if hs[i] is not None and hs[j] is not None:
                ha, hb = hs[i].double(), hs[j].double()
                rel[p].append(float((ha - hb).norm() / ha.norm().clamp(min=1e-30)))
            elif hs[i] is not None or hs[j] is not None:
                ok[p] = False
        del hs
    return out, [r if good else [] for r, good in zip(rel, ok)]


def _encoding_name(ck: Checkpoint) -> str:
    """The encodings of a checkpoint's block-scaled views, for notes."""
    from ckdiff.tensor.blockscaled import BlockScaled
    return ", ".join(sorted({t.encoding for t in ck.tensors.values() if isinstance(t, BlockScaled)}))


def compare_logits(a: Checkpoint, b: Checkpoint, batch: int = 4, length: int = 48, seed: int = 0,
                   dtype: str = "float32", topk: int = 5, skip_first: bool = False,
                   threshold: Optional[float] = None, progress_factory=None,
                   profile: str = "standard", device: Optional[str] = None) -> LogitsResult:
    """The observed divergence of A and B judged against the noise floor (compare/noise.py): the lossier
    side's encoding applied to the other side's weights, run in that side's runtime. Every KL is
    KL(reference || other), the reference being the side the floor's encoding is applied to, so the
    verdict does not depend on which side is A."""
    from ckdiff.runtime.forward import check_shapes, steps
    from ckdiff.compare import noise
    if length < 2:
        raise UsageError("--length must be >= 2: a 1-token prompt cannot show a rotary bug")
    if dtype not in DTYPE_BY_NAME:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPE_BY_NAME)}")
    if profile not in noise.PROFILES:
        raise UsageError(f"--profile {profile!r}: expected one of {', '.join(noise.PROFILES)}")
    prof = noise.PROFILES[profile]
    ca, cb = config_of(a), config_of(b)
    with torch.no_grad():
        check_shapes(a, ca, "A")
        check_shapes(b, cb, "B")
    true_a = ca.true_vocab or ca.vocab
    true_b = cb.true_vocab or cb.vocab
    vocab = min(true_a, true_b)
    bos, spec = special_ids(a, b)
    ids = random_ids(vocab, batch, length, seed, bos, spec)
    if device is not None:  # drawn on the CPU either way; the forward passes run where the ids are
        ids = ids.to(device)
    tdt = DTYPE_BY_NAME[dtype]
    ea, eb = noise.encoding_of(a), noise.encoding_of(b)
    enc, ref_side = noise.lossier(ea, eb)
    if not ref_side:  # the same encoding on both sides: the reference by path, whichever is A
        ref_side = "A" if (a.path, a.format) <= (b.path, b.format) else "B"
    r_ck, r_cfg = (a, ca) if ref_side == "A" else (b, cb)
    o_ck, o_cfg = (b, cb) if ref_side == "A" else (a, ca)
    sixteen = dtype in ("bfloat16", "float16")
    # float32 weights on both sides in float32/64 compute: the floor run would repeat the reference run
    # bit for bit (same runtime, same weights), so the floor is exactly zero without running it
    exact = enc.kind == "float" and enc.rank == 0 and not sixteen
    total = a.num_bytes + b.num_bytes + r_ck.num_bytes * (0 if exact else 2 if sixteen else 1)
    progress = progress_factory(total) if progress_factory else None
    gens = [steps(r_ck, r_cfg, ids, tdt, progress), steps(o_ck, o_cfg, ids, tdt, progress)]
    pairs = [(0, 1)]
    if not exact:
        gens.append(steps(noise.floor_checkpoint(r_ck, enc), r_cfg, ids, tdt, progress))
        pairs.append((0, 2))
    if sixteen:  # the floor's reference: the reference side's own weights computed in float32
        gens.append(steps(r_ck, r_cfg, ids, torch.float32, progress))
        pairs[1] = (3, 2)
    # The other side against the encoded reference: a correct conversion into the same encoding lands on
    # (nearly) the same codes, so this distance stays far below the floor while a bug keeps its own size.
    # Only when the encoding changes the reference's weights, and in float32/64 compute (in 16-bit compute
    # two runtimes' rounding alone would be as far apart as the floor).
    close = not exact and not sixteen and enc.rank > noise.encoding_of(r_ck).rank
    if close:
        pairs.append((2, 1))
    with torch.no_grad():
        logits, rels = _lockstep(gens, pairs)
    rel_errors = rels[0]
    m = logit_metrics(logits[0], logits[1], vocab, topk, skip_first)
    cm = logit_metrics(logits[2], logits[1], vocab, topk, skip_first) if close else None
    if exact:
        floor = noise.Floor(0.0, 0.0, 0.0, 1.0, [0.0] * len(rel_errors), enc.describe(), ref_side,
                            f"{ref_side}'s own weights in {dtype} (the same run: the floor is exactly zero)")
    else:
        fm = logit_metrics(logits[3] if sixteen else logits[0], logits[2], vocab, topk, skip_first)
        floor = noise.Floor(mean_kl=fm.mean_kl, p99_kl=noise.p99(fm.kl), max_kl=fm.max_kl,
                            top1_agreement=fm.top1_agreement, layer_rel_errors=list(rels[1]),
                            encoding=enc.describe(), applied_to=ref_side,
                            reference=f"{ref_side}'s own weights in {'float32' if sixteen else dtype}")
    del logits
    observed = {"mean_kl": m.mean_kl, "p99_kl": noise.p99(m.kl), "max_kl": m.max_kl,
                "top1_agreement": m.top1_agreement, "layer_rel_errors": rel_errors}
    encoded_ref = None if cm is None else {"mean_kl": cm.mean_kl, "max_kl": cm.max_kl,
                                           "top1_agreement": cm.top1_agreement, "layer_rel_errors": rels[-1]}
    signals = noise.judge(prof, observed, floor, threshold, encoded_ref)
    # a NaN ratio sorts nowhere: a signal whose numbers are not finite decides, and fails
    finite = [r for r in signals if all(math.isfinite(float(r[k])) for k in ("observed", "limit", "ratio"))]
    worst = max(finite, key=lambda r: r["ratio"]) if len(finite) == len(signals) else \
        next(r for r in signals if r not in finite)
    first_div = noise.first_divergent(prof, rel_errors, floor.layer_rel_errors)
    if progress is not None and hasattr(progress, "stop"):
        progress.stop()
    notes = []
    if bos is not None or spec:
        notes.append(f"prompts: BOS {bos} at position 0" + (f", special ids {list(spec)} inside every sequence"
                                                             if spec else ""))
    notes.append(f"noise floor: {ref_side}'s weights as {enc.describe()} (A is {ea.describe()}, B is "
                 f"{eb.describe()}), run in {ref_side}'s runtime; KL is KL({ref_side} || other)")
    thr = next(r["limit"] for r in signals if r["signal"] == "max_kl")
    reason = ("--threshold on the max per-token KL" if threshold is not None else
              f"{prof.name} profile: {prof.kl_mult:g} x the noise floor's max per-token KL + {prof.kl_abs:g}")
    if sixteen and any(_is_moe(c) for c in (ca, cb)):
        notes.append("MoE routing in 16-bit compute: rounding can pick different experts for near ties; "
                     "prefer --dtype float32 for a verdict")
    if vocab < max(ca.vocab, cb.vocab):
        notes.append(f"compared the first {vocab} vocab entries (A has {ca.vocab} rows, B {cb.vocab})")
    if (ca.rope_theta, ca.norm_eps) != (cb.rope_theta, cb.norm_eps):
        notes.append(f"configs differ: rope_theta {ca.rope_theta} vs {cb.rope_theta}, "
                     f"norm eps {ca.norm_eps} vs {cb.norm_eps}")
    sk = int(skip_first)
    worst_topk = m.worst_topk if ref_side == "A" else {  # label the top-k by side, whichever is the reference
        "a_ids": m.worst_topk["b_ids"], "a_logprob": m.worst_topk["b_logprob"],
        "b_ids": m.worst_topk["a_ids"], "b_logprob": m.worst_topk["a_logprob"]}
    return LogitsResult(
        a=a.path, b=b.path, format_a=a.format, format_b=b.format, dtype=dtype, batch=batch, length=length,
        seed=seed, vocab_compared=vocab, vocab_a=ca.vocab, vocab_b=cb.vocab, max_kl=m.max_kl,
        mean_kl=m.mean_kl, max_kl_at=[m.max_kl_at[0], m.max_kl_at[1] + sk],
        top1_agreement=m.top1_agreement, topk=m.topk, topk_agreement=m.topk_agreement,
        first_topk_failure=None if m.first_topk_failure is None else
        [m.first_topk_failure[0], m.first_topk_failure[1] + sk],
        max_abs=m.max_abs, max_abs_at=[m.max_abs_at[0], m.max_abs_at[1] + sk, m.max_abs_at[2]],
        nmse=m.nmse, first_divergent_layer=first_div, layer_rel_errors=rel_errors, threshold=thr,
        threshold_reason=reason, skip_first=skip_first, notes=notes,
        token_kl=[[float(f"{x:.4g}") for x in row] for row in m.kl.tolist()], worst_topk=worst_topk,
        p99_kl=observed["p99_kl"], profile=prof.name, kl_reference=ref_side,
        encodings={"A": ea.describe(), "B": eb.describe()}, noise_floor=asdict(floor), signals=signals,
        deciding_signal=worst["signal"], passed=len(finite) == len(signals) and worst["ratio"] <= 1.0,
        from_encoded_reference=encoded_ref,
        informative=floor.top1_agreement >= MIN_FLOOR_TOP1)


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


def _rows(logits: torch.Tensor, b: int, lo: int, hi: int, vocab: int) -> torch.Tensor:
    """Positions [lo, hi) of sequence ``b``, the first ``vocab`` entries, in float64."""
    return logits[b, lo:hi, :vocab].double()


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Per-row KL(P||Q) from log-probabilities, summed over the vocabulary."""
    e = lp.exp()
    return e.mul_(lp - lq).sum(-1)


def logit_metrics(logits_a: torch.Tensor, logits_b: torch.Tensor, vocab: int, topk: int = 5,
                  skip_first: bool = False) -> LogitMetrics:
    """The logit metrics, all in float64 from log_softmax, computed a block of positions of one sequence
    at a time: only one block's float64 [positions, vocab] temporaries are alive, whatever the batch.

    Every row-wise value (log_softmax, KL, argmax, top-k) is the whole-batch computation's own; the
    maxima combine exactly (first occurrence, NaN first, as ``Tensor.max``); means over [B, T] are taken
    over the whole [B, T] results. NMSE's sums over [B, T, V] combine by blocks (mean square, and the
    variance with Chan's pairwise update), so it agrees with one whole-tensor reduction to rounding."""
    B, T0 = logits_a.shape[0], logits_a.shape[1]
    sk = int(skip_first)
    T = T0 - sk
    k = min(topk, vocab)
    step = max(1, METRIC_BLOCK_BYTES // (8 * max(1, vocab)))
    kls, same1, mutual = [], [], []
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
        nmse=sq_sum / n / var if var > 0 else 0.0, worst_topk=worst)
