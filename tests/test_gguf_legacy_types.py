"""GGUF's other 32-element legacy types (Q4_1, Q5_0, Q5_1) are judged in units of their block's d, like
Q8_0 and Q4_0: a correct file is EQUIVALENT with its float source both ways (every quantized tensor was
DIFFER before they had a unit), and a swapped pair of tensors is still caught. Files written through the
gguf package's GGUFWriter and its own quantizer (gguf 0.19 ``quants.quantize``), by ckdiff's write_gguf."""
import pytest

from ckdiff.compare.diff import compare_checkpoints
from ckdiff.convert.api import read_source
from ckdiff.formats.readers import open_checkpoint
from ckdiff.formats.gguf import write_gguf


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_0", "Q5_1"])
def test_legacy_types_in_units_of_their_scale(tiny_hf, tmp_path, qtype):
    src = tiny_hf("llama-gqa")
    ck, cfg = read_source(str(src))
    hf = {k: t.load() for k, t in ck.tensors.items()}
    good = write_gguf(tmp_path / "good.gguf", hf, cfg, qtype)
    for a, b in ((src, good), (good, src)):
        r = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)))
        assert r.equivalent and r.counts().get("quant") == 16, r.counts_text()
    g, u = "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"
    hf[g], hf[u] = hf[u], hf[g]
    bad = write_gguf(tmp_path / "bad.gguf", hf, cfg, qtype)
    r = compare_checkpoints(open_checkpoint(str(src)), open_checkpoint(str(bad)))
    # the float side is mapped into GGUF's names (GGUF keeps its own scales)
    assert not r.equivalent and {t.name for t in r.tensors if not t.ok} == {"blk.1.ffn_gate.weight",
                                                                        "blk.1.ffn_up.weight"}
