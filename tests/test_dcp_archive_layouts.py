"""DCP chunks whose archives are laid out alike reuse the first one's reading (formats/dcp.py
``_archive_layout``): values as written, one layout per shape and dtype. Checkpoints written by torch's own
``torch.distributed.checkpoint.save``."""
import torch

from helpers import dcp_save
from ckdiff.formats import dcp
from ckdiff.formats.readers import open_checkpoint


def test_alike_chunks_share_one_reading_and_read_their_own_values(tmp_path):
    g = torch.Generator().manual_seed(11)
    state = {f"w{i}": torch.randn(3, 5, generator=g) for i in range(12)}
    state.update({f"h{i}": torch.randn(7, generator=g).half() for i in range(5)})
    dcp_save(state, tmp_path / "ck")
    dcp._LAYOUTS.clear()
    ck = open_checkpoint(str(tmp_path / "ck"))
    for k, v in state.items():
        assert torch.equal(ck[k].load(), v), k
    assert 1 <= len(dcp._LAYOUTS) <= 2  # one per (shape, dtype): the [3, 5] float32 and the [7] float16
    c = ck.tensors["w3"].chunks[0]
    assert dcp._archive_layout(c, torch.float32) is not None
    assert dcp._archive_layout(c, torch.float32) != dcp._archive_layout(ck.tensors["h0"].chunks[0], torch.float16)
