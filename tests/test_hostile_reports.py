"""Reports never land on an input, and names from any reader reach every report sink escaped.

Fixtures: ckdiff's golden writers (HF through ckdiff's HF writer, Meta, Megatron-LLM, Megatron-Core via
torch.distributed.checkpoint.save, GGUF via the gguf package's writer)."""
import os
from pathlib import Path

import pytest

from ckdiff.golden.emit import emit

LAYOUTS = ["hf", "meta", "megatron", "mcore", "gguf"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    base = tmp_path_factory.mktemp("inputs")
    out = {layout: emit(base / layout, "llama-gqa", layout, shards=2 if layout == "hf" else 1) for layout in LAYOUTS}
    from ckdiff.golden.models import write_tiny_hf
    tok = base / "tok"  # an HF directory with tokenizer files, read by `ckdiff logits`
    write_tiny_hf(tok, "llama-gqa", "float32", 0)
    out["hf+tokenizer"] = tok
    return out


def _files(root: Path) -> list:
    return sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_file_of_an_input_is_a_report_target(seeds, run_cli, layout):
    """Every file the reader opened or will open (indexes, configs, trackers, metadata, shards) is an input."""
    root = seeds[layout]
    files = _files(root)
    assert files
    for f in files:
        before = f.read_bytes()
        code, _, err = run_cli(root, root, "--json", f, "-q")
        assert code == 2 and "refusing to overwrite" in err, (f, err)
        assert f.read_bytes() == before, f


def test_a_hard_link_to_an_input_is_not_a_report_target(seeds, run_cli, tmp_path):
    root = seeds["megatron"]
    tracker = root / "latest_checkpointed_iteration.txt"
    link = tmp_path / "report.json"
    os.link(tracker, link)
    code, _, err = run_cli(root, root, "--json", link, "-q")
    assert code == 2 and "refusing to overwrite" in err, err
    assert tracker.read_text().strip() == "release"


def test_logits_refuses_its_tokenizer_files_as_targets(seeds, run_cli):
    root = seeds["hf+tokenizer"]
    for f in _files(root):
        code, _, err = run_cli("logits", root, root, "--markdown", f, "--length", 4)
        assert code == 2 and "refusing to overwrite" in err, (f, err)
