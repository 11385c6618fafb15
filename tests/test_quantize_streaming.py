"""Per-channel quantization streams by row blocks (codes and scales from the same rows, the scales handed
from the codes to the scaler so they are computed once) and equals the whole-tensor JetStream formula
(``quantize``) bit for bit; the shapes ``Quantize`` announces on the meta device equal those it produces."""
from __future__ import annotations

import pytest
import torch

from ckdiff.tensor.lazy import EagerTensor
from ckdiff.formats.jetstream_quant import Quantize, quantize, quantize_tensors
from ckdiff.io.safetensors import read_safetensors, write_safetensors
from ckdiff.io.torch_zip import TensorSource


class Counted(EagerTensor):
    """Counts the rows read, to see which pass reads the weight."""

    def __init__(self, name, tensor):
        super().__init__(name, tensor)
        self.read = 0

    def rows(self, start, stop):
        self.read += stop - start
        return super().rows(start, stop)


def weight(rows, cols, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 3
    w[rows // 3] = 0.0  # an all-zero row: the clamp decides its scale
    w[rows - 1, cols // 2] = 40.0  # a row maximum in the last block
    return w.to(dtype)


@pytest.mark.parametrize("qtype", ["int8_per_channel", "int4_per_channel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_per_channel_row_blocks_equal_the_whole_tensor(qtype, dtype):
    bits = 8 if "int8" in qtype else 4
    w = weight(301, 40, dtype, 5)
    src = Counted("layers.0.attention.wq.weight", w)
    out = quantize_tensors({src.name: src}, qtype)
    codes, scale = out[src.name], out[src.name + "_scaler"]
    q, s = quantize(w, bits, False)
    assert (codes.dtype, tuple(codes.shape), scale.dtype, tuple(scale.shape)) == \
        (q.dtype, tuple(q.shape), s.dtype, tuple(s.shape))
    # the writers' order: codes in row blocks, then the scales in row blocks
    step = 37
    got_q = torch.cat([codes.rows(a, min(a + step, 301)) for a in range(0, 301, step)])
    read_by_codes = src.read
    got_s = torch.cat([scale.rows(a, min(a + step, 301)) for a in range(0, 301, step)])
    assert torch.equal(got_q, q) and torch.equal(got_s, s)
    assert read_by_codes == 301 and src.read == 301  # the scales came from the codes' pass
    # scales asked on their own (or again) are computed from the weight, and equal
    assert torch.equal(scale.load(), s) and src.read == 602
    assert torch.equal(scale.rows(100, 150), s[100:150])
    assert torch.equal(codes.load(), q)


def test_scales_out_of_order_are_computed():
    w = weight(64, 16, torch.bfloat16, 9)
    src = Counted("output.weight", w)
    out = quantize_tensors({"output.weight": src}, "int8_per_channel")
    q, s = quantize(w, 8, False)
    assert torch.equal(out["output.weight"].rows(10, 20), q[10:20])  # not a prefix: nothing kept
    assert torch.equal(out["output.weight_scaler"].rows(0, 64), s)
    assert torch.equal(out["output.weight"].rows(0, 30), q[:30])  # a prefix of 30 rows only
    assert torch.equal(out["output.weight_scaler"].rows(0, 64), s)


def test_written_file_equals_whole_tensor_quantization(tmp_path):
    """Through the safetensors writer (8 MiB row blocks sized by the weight's rows), with an embedding,
    a GQA k (fewer rows than q) and a norm left alone."""
    ws = {"tok_embeddings.weight": weight(97, 24, torch.bfloat16, 1),
          "layers.0.attention.wq.weight": weight(24, 24, torch.bfloat16, 2),
          "layers.0.attention.wk.weight": weight(8, 24, torch.bfloat16, 3),
          "layers.0.attention_norm.weight": torch.rand(24).to(torch.bfloat16) + 0.5,
          "output.weight": weight(97, 24, torch.bfloat16, 4)}
    out = quantize_tensors({k: EagerTensor(k, v) for k, v in ws.items()}, "int8_per_channel")
    write_safetensors(tmp_path / "m.safetensors", out.values())
    back = {k: t.load() for k, t in read_safetensors(tmp_path / "m.safetensors").items()}
    for k, w in ws.items():
        if k.endswith("norm.weight"):
            assert torch.equal(back[k], w)
            continue
        q, s = quantize(w, 8, False, axis=0 if k.startswith("tok_") else -1)
        assert torch.equal(back[k], q) and torch.equal(back[k + "_scaler"], s), k
    src = TensorSource.rows_of(out["output.weight"], chunk_bytes=200)
    assert torch.equal(torch.cat(list(src.chunks())), quantize(ws["output.weight"], 8, False)[0])


@pytest.mark.parametrize("shape,bits,blockwise,embedding", [
    ((48, 256), 8, False, False), ((1, 256), 8, False, False), ((48, 1), 4, False, False),
    ((3, 48, 256), 8, False, False), ((1, 48, 256), 4, False, False),
    ((48, 256), 8, True, False), ((1, 256), 4, True, False), ((48, 128), 8, True, False),
    ((97, 24), 8, False, True), ((1, 24), 8, False, True), ((97, 1), 8, False, True)])
def test_meta_shapes_equal_computed_ones(shape, bits, blockwise, embedding):
    op = Quantize(bits, blockwise, embedding)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))).to(torch.bfloat16)
    real = op([w])
    meta = op([w.to("meta")])
    assert [(m.shape, m.dtype, m.device.type) for m in meta] == [(r.shape, r.dtype, "meta") for r in real]
