"""JetStream-pt weight quantization (jetstream-pytorch ``jetstream_pt/quantize.py`` and
``convert_checkpoints.py`` at f32f9c6).

Symmetric, no zero point: ``s = max|w| / qmax`` over the reduction axis
(clamped to >= 1e-5), ``q = clamp(round(w * (1/s)), qmin, qmax)`` as int8, the
arithmetic in the source dtype, scales stored as bf16 under ``<key>_scaler``.
Blockwise splits the input axis into blocks of 128 and stores ``q`` as
``[nb, 128, out]`` with scales ``[nb, out]``. The embedding is always int8 per
column. Scales are fully squeezed as the original converter did; readers accept both.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import torch

from ckdiff.errors import InputError, UsageError
from ckdiff.tensor.blockscaled import BlockScaled, Scaled, fold
from ckdiff.tensor.lazy import Checkpoint, DerivedGroup, LazyTensor, OutputCache
from ckdiff.tensor.ops import Op

QUANT_TYPES = ("int8_per_channel", "int4_per_channel", "int8_blockwise", "int4_blockwise")
BLOCK = 128
LINEAR = re.compile(r"(attention\.w[qkvo]\.weight|feed_forward\.w[123]\.weight|^output\.weight"
                    r"|self_attn\.(w[qkv]|o_proj)\.weight|mlp\.(gate|up|down)_proj\.weight"  # Gemma
                    r"|block_sparse_moe\.gate\.weight|cond_ffn\.w[123])$")  # Mixtral router and experts
EXPERTS = re.compile(r"cond_ffn\.w[123]$")
EMBED = re.compile(r"^(tok_embeddings|embedder)\.weight$")
SCALER = "_scaler"
# per-element bound in units of the stored scale (bf16 arithmetic measured 1.14 / 0.53)
BOUND = {8: 1.5, 4: 1.0}
# row blocks of the embedding's column-maximum pass (its |w| is one temporary of this size), like the
# writers' 8 MiB blocks: the allocator keeps freed blocks of the largest size seen for reuse
BLOCK_BYTES = 8 << 20


def bits_of(qtype: str) -> int:
    return 8 if "int8" in qtype else 4


def _scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """The divisor from the absolute maxima (in the weight's dtype, as JetStream computes it)."""
    return amax.clamp(min=1e-5) / (2 ** (bits - 1) - 1)


def _codes(w: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    y = w * (1 / s)  # one temporary in the weight's dtype, rounded and clamped in place
    return y.round_().clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).to(torch.int8)


def _meta_outputs(shape: tuple, bits: int, blockwise: bool, axis: int) -> list[torch.Tensor]:
    """``quantize``'s outputs on the meta device from shapes alone: an arithmetic op on a meta tensor
    loads torch's Python meta kernels (about 65 MiB of RssAnon) just to learn two shapes."""
    if not blockwise:
        kept = list(shape)
        kept[axis] = 1
        sshape = [d for d in kept if d != 1]  # ``squeeze()`` of the keepdim scales
    else:
        out, n = shape
        shape = (n // BLOCK, BLOCK, out)
        sshape = [d for d in (n // BLOCK, out) if d != 1]
    return [torch.empty(shape, dtype=torch.int8, device="meta"),
            torch.empty(sshape, dtype=torch.bfloat16, device="meta")]


def quantize(w: torch.Tensor, bits: int, blockwise: bool, axis: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8, scales bf16) for a linear weight [out, in] or stacked experts [E, out, in]
    (reduced over the input axis), or an embedding with axis=0 (one scale per column)."""
    if not blockwise:
        s = _scale(w.abs().amax(dim=axis, keepdim=True), bits)
        return _codes(w, s, bits), s.to(torch.bfloat16).squeeze()
    out, n = w.shape
    if n % BLOCK:
        raise UsageError(f"blockwise quantization needs the input dimension to be a multiple of {BLOCK}, got {n}")
    wb = w.reshape(out, n // BLOCK, BLOCK)
    s = _scale(wb.abs().amax(dim=2, keepdim=True), bits)
    q = _codes(wb, s, bits)
    return q.permute(1, 2, 0).contiguous(), s.squeeze(-1).T.contiguous().to(torch.bfloat16).squeeze()


def dequantize(q: torch.Tensor, s: torch.Tensor, shape, embedding: bool = False) -> torch.Tensor:
    """Float weight of ``shape`` from codes and scales (either layout, squeezed or not)."""
    qf, sf = q.to(torch.float32), s.to(torch.float32)
    if embedding:
        return qf * sf.reshape(1, -1)
    if len(shape) == 3:  # stacked experts [E, out, in], per-channel scales [E, out]
        return qf * sf.reshape(shape[0], shape[1], 1)
    out, n = shape
    if q.dim() == 3:  # blockwise [nb, 128, out]
        nb = q.shape[0]
        w = qf * sf.reshape(nb, 1, out)
        return w.permute(2, 0, 1).reshape(out, n)
    return qf * sf.reshape(-1, 1)


class Quantize(Op):
    """One weight -> (codes, scales); lossy, so it has no reverse."""
    n_in, n_out = 1, 2

    def __init__(self, bits: int, blockwise: bool, embedding: bool = False):
        self.bits, self.blockwise, self.embedding = bits, blockwise, embedding

    @property
    def rowlocal(self) -> bool:
        """Per-channel scales of a linear come from its own row: any row block quantizes alone."""
        return not self.blockwise and not self.embedding

    def __call__(self, xs):
        if xs[0].device.type == "meta":
            if self.blockwise and not self.embedding and xs[0].shape[-1] % BLOCK:
                return list(quantize(xs[0], self.bits, True))  # the one clear error, as on data
            return _meta_outputs(tuple(xs[0].shape), 8 if self.embedding else self.bits,
                                 self.blockwise and not self.embedding, 0 if self.embedding else -1)
        if self.embedding:
            return list(quantize(xs[0], 8, False, axis=0))
        return list(quantize(xs[0], self.bits, self.blockwise))

    def reverse(self):
        raise NotImplementedError("quantization is lossy: use dequantize")

    def describe(self):
        return "quantize int8 per column" if self.embedding else \
            f"quantize int{self.bits} {'blockwise-128' if self.blockwise else 'per channel'}"


class ColumnScale(LazyTensor):
    """The per-column int8 scales of an embedding (``quantize(w, 8, False, axis=0)``'s second output),
    computed by streaming the embedding's row blocks: the column maxima combine exactly, so the scales
    equal the whole-tensor computation bit for bit while only one row block is in memory."""

    def __init__(self, name: str, src: LazyTensor):
        super().__init__(name, (src.shape[1],), torch.bfloat16, src.origin)
        self.src = src
        self._s: Optional[torch.Tensor] = None

    def divisor(self) -> torch.Tensor:
        """The scale as ``quantize`` divides by: shape [1, columns], in the embedding's dtype."""
        if self._s is None:
            m = None
            for a, b in self.src.row_chunks(BLOCK_BYTES):
                part = self.src.rows(a, b).abs().amax(dim=0, keepdim=True)
                m = part if m is None else torch.maximum(m, part)
            if m is None:
                m = torch.zeros((1, self.shape[0]), dtype=self.src.dtype)
            self._s = _scale(m, 8)
        return self._s

    def load(self) -> torch.Tensor:
        return self.divisor().to(torch.bfloat16).squeeze()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.load()[start:stop]


class ColumnCodes(LazyTensor):
    """The int8 codes of an embedding quantized per column, row block by row block (row-local once the
    column scales are known)."""

    def __init__(self, name: str, src: LazyTensor, scale: ColumnScale):
        super().__init__(name, src.shape, torch.int8, src.origin)
        self.src, self.scale = src, scale

    @property
    def row_read_bytes(self) -> int:
        return max(self.src.row_read_bytes, self.shape[1])  # a row of codes reads a row of the embedding

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return _codes(self.src.rows(start, stop), self.scale.divisor(), 8)

    def load(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])


class ChannelScale(LazyTensor):
    """The per-row scales of a linear [out, in] quantized per channel (``quantize(w, bits, False)``'s
    second output, out > 1), row block by row block. The codes of the same rows compute these scales
    anyway: ``ChannelCodes`` hands them over (a prefix of the rows, 2 bytes each), so scales written
    after their codes (the writers' order) are not computed a second time; any other order computes."""

    def __init__(self, name: str, src: LazyTensor, bits: int):
        super().__init__(name, (src.shape[0],), torch.bfloat16, src.origin)
        self.src, self.bits = src, bits
        self._known: Optional[torch.Tensor] = None  # scales of rows [0, self._upto), from the codes
        self._upto = 0

    @property
    def row_read_bytes(self) -> int:
        return self.src.row_read_bytes  # a scale costs a row of the weight

    def divisor(self, w: torch.Tensor) -> torch.Tensor:
        """The divisor of rows ``w`` as ``quantize`` computes it: [rows, 1] in the weight's dtype."""
        return _scale(w.abs().amax(dim=-1, keepdim=True), self.bits)

    def keep(self, start: int, stop: int, s: torch.Tensor) -> None:
        """Scales of rows [start, stop) computed by the codes (kept while they extend the prefix)."""
        if start == 0:
            self._known, self._upto = torch.empty(self.shape, dtype=torch.bfloat16), 0
        if self._known is not None and start == self._upto:
            self._known[start:stop] = s.reshape(-1)
            self._upto = stop

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if self._known is not None and stop <= self._upto:
            out = self._known[start:stop]
            if stop == self.shape[0]:  # the last block served: nothing more is kept
                self._known, self._upto = None, 0
            return out
        return self.divisor(self.src.rows(start, stop)).to(torch.bfloat16).reshape(-1)

    def load(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])


class ChannelCodes(LazyTensor):
    """The int8 codes of a linear [out, in] quantized per channel, row block by row block."""

    def __init__(self, name: str, src: LazyTensor, scale: ChannelScale):
        super().__init__(name, src.shape, torch.int8, src.origin)
        self.src, self.scale = src, scale

    @property
    def row_read_bytes(self) -> int:
        return max(self.src.row_read_bytes, self.shape[1])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        w = self.src.rows(start, stop)
        s = self.scale.divisor(w)
        self.scale.keep(start, stop, s.to(torch.bfloat16))
        return _codes(w, s, self.scale.bits)

    def load(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])


def quantize_tensors(tensors: dict[str, LazyTensor], qtype: str, family: str = "llama") -> dict[str, LazyTensor]:
    if qtype not in QUANT_TYPES:
        raise UsageError(f"--quantize_type {qtype!r}: expected one of {', '.join(QUANT_TYPES)}")
    bits, block = bits_of(qtype), "blockwise" in qtype
    from ckdiff.models import families
    fam = families.get(family)
    refused = fam.jetstream_quant_refused if fam is not None else {}
    for kind, asked in (("int4", bits == 4), ("blockwise", block)):
        if asked and kind in refused:
            raise UsageError(f"--quantize_type {qtype}: {refused[kind]}")
    out: dict[str, LazyTensor] = {}
    cache = OutputCache()  # this quantization's computed outputs (codes and scales of one weight)
    for k, t in tensors.items():
        if EMBED.search(k) or LINEAR.search(k):
            emb = bool(EMBED.search(k))
            if block and not emb and t.shape[-1] % BLOCK:
                raise UsageError(f"{qtype}: {k} has input dimension {t.shape[-1]}, not a multiple of {BLOCK}")
            if emb and len(t.shape) == 2:  # one scale per column: a reduction over rows, then row blocks
                scale = ColumnScale(k + SCALER, t)
                out[k], out[k + SCALER] = ColumnCodes(k, t, scale), scale
                continue
            if not emb and not block and len(t.shape) == 2 and t.shape[0] > 1:  # one scale per row
                scale = ChannelScale(k + SCALER, t, bits)
                out[k], out[k + SCALER] = ChannelCodes(k, t, scale), scale
                continue
            g = DerivedGroup([t], Quantize(bits, block, emb), cache=cache)
            for x in g.tensors([k, k + SCALER]):
                out[x.name] = x
        else:
            out[k] = t
    return out


def is_quantized(tensors) -> bool:
    """JetStream int8/int4 tensors, as stored (``*_scaler`` siblings) or as views."""
    return any(k.endswith(SCALER) or isinstance(t, JetStreamQuant) for k, t in tensors.items())


def dequantize_tensors(tensors: dict[str, LazyTensor], shapes: dict[str, tuple] | None = None) -> dict[str, LazyTensor]:
    """Float (fp32) lazy tensors from a quantized JetStream mapping; ``shapes`` gives float shapes."""
    out: dict[str, LazyTensor] = {}
    cache = OutputCache()
    for k, t in tensors.items():
        if k.endswith(SCALER):
            continue
        if k + SCALER in tensors:
            emb = bool(EMBED.search(k))
            shp = (shapes or {}).get(k) or float_shape(t, k)
            g = DerivedGroup([t, tensors[k + SCALER]], lambda xs, shp=shp, emb=emb: [
                dequantize(xs[0], xs[1], shp, emb) if xs[0].device.type != "meta"
                else torch.empty(shp, dtype=torch.float32, device="meta")], cache=cache)
            out[k] = g.tensors([k])[0]
        else:
            out[k] = t
    return out


def float_shape(q: LazyTensor, name: str = "") -> tuple:
    """Shape of the float weight behind codes ``q`` (blockwise codes are [nb, 128, out])."""
    if len(q.shape) == 3 and not EXPERTS.search(name or q.name):
        nb, b, o = q.shape
        return (o, nb * b)
    return tuple(q.shape)


EMBED_NAMES = re.compile(r"^(tok_embeddings\.weight|model\.embed_tokens\.weight|"
                         r"language_model\.embedding\.word_embeddings\.weight|transformer\.word_embeddings\.weight)$")


def fake_quantize(tensors: dict[str, LazyTensor], qtype: str) -> dict[str, LazyTensor]:
    """Quantize-then-dequantize every 2-D weight of any layout, as JetStream would.

    Per-row (and per-row-block) quantization commutes with the row permutations and
    fusions between layouts, so this gives the reference a correct quantization of
    the float model reaches, in the float model's own layout. Embeddings: int8 per column.
    """
    bits, block = bits_of(qtype), "blockwise" in qtype
    out: dict[str, LazyTensor] = {}
    cache = OutputCache()
    for k, t in tensors.items():
        if len(t.shape) != 2:
            out[k] = t
            continue
        emb = bool(EMBED_NAMES.search(k))

        def fq(xs, emb=emb):
            w = xs[0]
            if w.device.type == "meta":
                return [torch.empty(w.shape, dtype=torch.float32, device="meta")]
            if emb:
                q, s = quantize(w, 8, False, axis=0)
            else:
                q, s = quantize(w, bits, block and w.shape[-1] % BLOCK == 0)
            return [dequantize(q, s, w.shape, emb)]
        out[k] = DerivedGroup([t], fq, cache=cache).tensors([k])[0]
    return out


def qtype_of(config: dict, tensors: dict) -> str:
    """Quantization type from params.json, or inferred from codes and shapes."""
    if config.get("quantize_type"):
        return config["quantize_type"]
    views = [t for t in tensors.values() if isinstance(t, JetStreamQuant) and not t.embedding]
    if views:
        return f"int{max(v.bits for v in views)}_{'blockwise' if any(v.blockwise for v in views) else 'per_channel'}"
    block = any(len(t.shape) == 3 for k, t in tensors.items() if k + SCALER in tensors and not EXPERTS.search(k))
    small = all(int(t.load().abs().max()) <= 8 for k, t in tensors.items()
                if k + SCALER in tensors and not EMBED.search(k))
    return f"int{4 if small else 8}_{'blockwise' if block else 'per_channel'}"


# ------------------------------------------------------------------ read as logical views
class JetStreamQuant(BlockScaled):
    """A JetStream int8/int4 weight (codes ``q`` and bf16 scales ``s``) as its logical float tensor:
    per channel ``[out, in]`` codes with a scale per row, an embedding with a scale per column, blockwise
    ``[nb, 128, out]`` codes with a scale per 128 inputs of each row, stacked experts ``[E, out, in]``
    with a scale per row of each expert. ``bits`` from params.json ``quantize_type``, else from the codes."""

    def __init__(self, name: str, q: LazyTensor, s: LazyTensor, bits: Optional[int] = None):
        self.q, self.s = q, s
        self.embedding = bool(EMBED.search(name))
        shape = float_shape(q, name)
        self.blockwise = len(q.shape) == 3 and tuple(shape) != tuple(q.shape)
        self._bits = 8 if self.embedding else bits
        self._codes: Optional[torch.Tensor] = None  # blockwise codes, read once per pass over the rows
        super().__init__(name, shape, q.origin, "", 0.0, (q.name, s.name))
        per = shape[1] if self.embedding else (shape[0] * (shape[1] // BLOCK) if self.blockwise
                                                else math.prod(shape[:-1]))
        if len(shape) < 2 or s.numel != per or q.dtype != torch.int8:
            raise InputError(q.origin, f"{s.name}: {list(s.shape)} {s.dtype} scales do not fit the {q.dtype} "
                                       f"codes {name} {list(q.shape)} (expected {per} scales of int8 codes)")
        sc = s.load()  # one scale per row or block: small, checked once when the checkpoint is opened
        bad = (~torch.isfinite(sc.float())).nonzero()
        if len(bad):
            at = bad[0].tolist()
            raise InputError(q.origin, f"{s.name}: scale {float(sc[tuple(at)])} at {at} is not a finite number "
                                       f"({len(bad)} such scale(s)): the weight {name} cannot be dequantized")

    @property
    def bits(self) -> int:
        if self._bits is None:  # int4 codes stay within -8..7 (as the compare of old inferred them)
            c = self.q.load()
            self._bits = 4 if int(c.max()) <= 8 and int(c.min()) >= -8 else 8
        return self._bits

    @property
    def encoding(self) -> str:
        how = "per column" if self.embedding else ("blockwise-128" if self.blockwise else "per channel")
        return f"int{self.bits} {how}"

    @encoding.setter
    def encoding(self, _):  # fixed by the codes
        pass

    @property
    def bound(self) -> float:
        return BOUND[self.bits]

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.s.nbytes

    def scaled(self, start: int, stop: int) -> Scaled:
        C = self.shape[-1]
        if self.embedding:
            grid = self.s.load().float().reshape(1, C)
            return Scaled(self.q.rows(start, stop), grid, (self.shape[0], 1))
        if self.blockwise:
            if self._codes is None or start == 0:
                self._codes = self.q.load()
            codes = self._codes[:, :, start:stop].permute(2, 0, 1).reshape(stop - start, C)
            nb = self._codes.shape[0]
            grid = self.s.load().float().reshape(nb, self.shape[0])[:, start:stop].T.contiguous()
            if stop >= self.shape[0]:
                self._codes = None
            return Scaled(codes, grid, (1, BLOCK))
        codes = self.q.rows(start, stop).reshape(-1, C)
        grid = (self.s.rows(start, stop) if self.s.shape else self.s.load()).float().reshape(-1, 1)
        return Scaled(codes, grid, (1, C))

    def raw(self, start: int, stop: int) -> torch.Tensor:
        s = self.scaled(start, stop)
        return torch.cat([s.codes.contiguous().reshape(-1).view(torch.uint8),
                          s.grid.to(torch.bfloat16).contiguous().reshape(-1).view(torch.uint8)])

    def problems(self, s: Scaled) -> list[str]:
        out = []
        lo, hi = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        if s.codes.numel():
            cmin, cmax = torch.aminmax(s.codes)
            if int(cmin) < lo or int(cmax) > hi:
                out.append(f"codes outside the int{self.bits} range")
        if not bool((s.grid > 0).all()):
            out.append("non-positive or non-finite scales")
        return out

    def reference(self, x: torch.Tensor) -> Optional[Scaled]:
        """JetStream's own quantizer on float rows ``x`` (whole rows of the logical tensor)."""
        try:
            if self.embedding:
                q, s = quantize(x, 8, False, axis=0)
                return Scaled(q, s.float().reshape(1, -1), (x.shape[0], 1))
            if self.blockwise:
                q, s = quantize(x, self.bits, True)
                nb = q.shape[0]
                return Scaled(q.permute(2, 0, 1).reshape(x.shape), s.float().reshape(nb, -1).T.contiguous(),
                              (1, BLOCK))
            q, s = quantize(x, self.bits, False)
            return Scaled(q, s.float().reshape(-1, 1), (1, x.shape[-1]))
        except (UsageError, RuntimeError):
            return None


def jetstream_view(ck: Checkpoint) -> Checkpoint:
    """Each int8 weight with a ``_scaler`` sibling becomes one ``JetStreamQuant`` view under its name."""
    pairs = [k for k, t in ck.tensors.items() if not k.endswith(SCALER) and k + SCALER in ck.tensors
             and t.dtype == torch.int8]
    if not pairs:
        return ck
    qt = (ck.config or {}).get("quantize_type")
    bits = bits_of(qt) if isinstance(qt, str) and qt in QUANT_TYPES else None
    views = {k: JetStreamQuant(k, ck.tensors[k], ck.tensors[k + SCALER], bits) for k in pairs}
    note = (f"{len(views)} JetStream {qt or 'int8/int4'} weights: read as their dequantized values, judged in "
            f"units of their own scale (int8 {BOUND[8]} x scale, int4 {BOUND[4]} x scale)")
    return fold(ck, views, "JetStream scale", note)


def _declare() -> None:
    from ckdiff.formats.registry import Encoding, register_encoding
    register_encoding(Encoding("jetstream", "JetStream int8/int4 codes with <name>_scaler scales, read as logical "
                                            "block-scaled views", jetstream_view))


_declare()
