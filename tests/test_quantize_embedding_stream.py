"""The embedding's per-column int8 quantization streams by row blocks and equals the whole-tensor
reference (``quantize(w, 8, False, axis=0)``, the JetStream formula) bit for bit."""
from __future__ import annotations

import pytest
import torch

from ckdiff.tensor.lazy import EagerTensor
from ckdiff.formats.jetstream_quant import quantize, quantize_tensors


class SmallChunks(EagerTensor):
    """Row chunks of ~4 KiB, so the column maxima are combined over many blocks."""

    def __init__(self, name, tensor):
        super().__init__(name, tensor)
        self.rows_read = []

    def row_chunks(self, chunk_bytes: int = 4096):
        return super().row_chunks(4096)

    def rows(self, start, stop):
        self.rows_read.append(stop - start)
        return super().rows(start, stop)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_embedding_quantization_by_row_blocks_equals_the_whole_tensor(dtype):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(1001, 48, generator=g) * torch.rand(1, 48, generator=g) * 4).to(dtype)
    w[997, 7] = 50.0  # a column maximum in the last block
    w[:, 11] = 0.0    # an all-zero column: the clamp decides its scale
    src = SmallChunks("tok_embeddings.weight", w)
    out = quantize_tensors({"tok_embeddings.weight": src}, "int8_per_channel")
    q, s = quantize(w, 8, False, axis=0)
    codes = out["tok_embeddings.weight"]
    blocks = torch.cat([codes.rows(a, min(a + 128, 1001)) for a in range(0, 1001, 128)])
    assert torch.equal(out["tok_embeddings.weight_scaler"].load(), s)
    assert torch.equal(blocks, q)
    assert max(src.rows_read) < 1001  # scales and codes without the whole embedding at once
    assert torch.equal(codes.load(), q)
