"""Shared test helpers (imported by the test modules)."""
import contextlib
import io
import pickle
import warnings
from pathlib import Path

import torch

from ckdiff.compare.diff import Options, compare_checkpoints
from ckdiff.commands.convert import COMMANDS
from ckdiff.formats.readers import open_checkpoint


def convert(*argv):
    """Run a `ckdiff convert` subcommand in-process; returns its exit code."""
    argv = [str(a) for a in argv]
    with contextlib.redirect_stdout(io.StringIO()):
        return COMMANDS[argv[0]](argv[1:])


def diff(a, b, **kw):
    return compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)), Options(**kw))


def assert_same(a, b):
    res = diff(a, b)
    bad = [(t.name, t.status, t.diagnosis) for t in res.tensors if t.status != "equal"]
    assert not bad, bad
    return res


def tree(p: Path):
    return sorted(str(x.relative_to(p)) for x in p.rglob("*"))


def dcp_save(state, path, flatten=True):
    """torch.distributed.checkpoint.save in one process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path), no_dist=True, planner=DefaultSavePlanner(flatten_state_dict=flatten))


def write_chunked(path, tensors: dict, splits: dict):
    """A DCP directory whose tensors are cut into chunks (as ranks write them), built from DCP's own
    metadata classes and storage layout: each chunk a torch.save archive at a byte range."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)
    path.mkdir(parents=True)
    sdm, storage, files = {}, {}, {}
    for name, t in tensors.items():
        chunks = []
        for j, (lo, hi) in enumerate(splits[name]):
            fname = f"__{j % 2}_0.distcp"
            f = files.setdefault(fname, io.BytesIO())
            off = f.tell()
            torch.save(t[lo:hi].clone(), f)
            offs = torch.Size([lo] + [0] * (t.dim() - 1))
            chunks.append(ChunkStorageMetadata(offsets=offs, sizes=torch.Size([hi - lo, *t.shape[1:]])))
            storage[MetadataIndex(name, offs, j)] = _StorageInfo(fname, off, f.tell() - off)
        sdm[name] = TensorStorageMetadata(TensorProperties(dtype=t.dtype), t.shape, chunks)
    for fname, f in files.items():
        (path / fname).write_bytes(f.getvalue())
    with open(path / ".metadata", "wb") as f:
        pickle.dump(Metadata(state_dict_metadata=sdm, storage_data=storage), f)
    return path


def browser():
    """Headless Chromium through selenium (the HTML report tests); skips when either is missing."""
    import os
    import shutil

    import pytest
    pytest.importorskip("selenium")
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("chromium / chromedriver not installed (.ci/run installs them)")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager reach the network
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    o = webdriver.ChromeOptions()
    o.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1400,1000"):
        o.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=o)


def box(d, el):
    """[left, top, right, bottom] of an element in the viewport."""
    return d.execute_script("const r=arguments[0].getBoundingClientRect();return [r.left,r.top,r.right,r.bottom];", el)


def llama_hf(out, seed: int, tied: bool = False):
    """A tiny transformers ``LlamaForCausalLM`` (GQA: 4 heads over 2 KV heads, transformers' own random init
    seeded by ``seed``), saved by ``save_pretrained`` to ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tied, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def rewrite_hf(src, out, tensors=None, config=None):
    """A copy of the HF directory ``src`` at ``out``: its state dict edited in place by ``tensors(state)`` and
    saved by safetensors' own ``save_file``, its config.json edited by ``config(dict)``."""
    import json

    from safetensors.torch import load_file, save_file
    out.mkdir()
    state = load_file(str(src / "model.safetensors"))
    if tensors:
        tensors(state)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    if config:
        config(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def train_spm(d: Path, words, seed: int, per_line: int, lines: int, vocab: int) -> Path:
    """``d/tokenizer.model``: a BPE model trained by sentencepiece on ``lines`` lines of ``per_line`` words drawn at
    random (seeded) from ``words``."""
    import pytest
    spm = pytest.importorskip("sentencepiece")
    g = torch.Generator().manual_seed(seed)
    text = (" ".join(words[int(i)] for i in torch.randint(0, len(words), (per_line,), generator=g))
            for _ in range(lines))
    (d / "corpus.txt").write_text("\n".join(text))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=vocab,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    (d / "corpus.txt").unlink()
    return d / "tokenizer.model"


def redraw(model, seed: int, router_scale: float = 0.3):
    """Every floating parameter and buffer of a transformers model but the rotary tables drawn again at random
    (seeded): norms (layer, q and k norms) around 1 (x 0.1), router weights (``gate.weight``, ``router.weight``)
    x ``router_scale``, the rest x 0.3 (e_score_correction_bias included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "rotary_emb" in n or not p.dtype.is_floating_point:
                continue
            base = 1.0 if n.endswith("norm.weight") else 0.0
            scale = 0.1 if base else (router_scale if n.endswith(("gate.weight", "router.weight")) else 0.3)
            p.copy_(base + torch.randn(p.shape, generator=g) * scale)
    return model


def assert_equivalent_both_ways(run_cli, a, b, what: str = "", quant: bool = False) -> None:
    """``ckdiff A B`` and ``ckdiff B A`` both EQUIVALENT (the verdict does not depend on the order); with
    ``quant`` the verdict line counts quantized tensors."""
    for x, y in ((a, b), (b, a)):
        code, out, err = run_cli(x, y)
        assert code == 0 and out.startswith("EQUIVALENT"), f"{what}: " + out + err
        if quant:
            assert "quant" in out.splitlines()[0], out
