"""Fixtures written by the real producers (megatron-core, torch FSDP2, llama.cpp's converter,
compressed-tensors), built once per test session.

Each builder runs the producer in subprocesses (one per rank, with the variables torchrun sets) and
caches its output: under the session's pytest tmp dir, or, when ``CKDIFF_PRODUCER_CACHE`` names a
directory, there, keyed by a hash of the builder scripts and the producer versions (so a changed
builder or version builds afresh).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def version(dist: str) -> str:
    """The installed version of a producer; a missing producer fails the test (never a skip: CI installs
    every producer in .ci/run)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise AssertionError(f"{dist} is not installed: .ci/run installs it (pip, pinned); install it the same "
                             "way to run the real-producer tests") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, world: int, *args, timeout: float = 300) -> None:
    """Run ``script`` on ``world`` ranks (gloo, this machine), as torchrun would; raise with the failing
    rank's output if any rank fails."""
    port = _free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world), PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, args)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outs)):
        if p.returncode:
            raise AssertionError(f"{script.name} rank {r} exited {p.returncode}:\n{out[-3000:]}")


def launch_together(*runs) -> None:
    """``launch(script, world, *args)`` for each ``(script, world, *args)`` of ``runs`` at once (one thread each);
    the first failure raised once all have ended."""
    import threading
    errs = []

    def run(*args):
        try:
            launch(*args)
        except AssertionError as e:  # re-raised in the caller's thread below
            errs.append(e)
    ts = [threading.Thread(target=run, args=r) for r in runs]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errs:
        raise errs[0]


_BUILT: dict = {}  # (name, keys) -> directory built in this session


def cached(tmp_path_factory, name: str, build, *keys: str) -> Path:
    """``build(out)`` once per session (or once per key in CKDIFF_PRODUCER_CACHE); the directory appears
    only when the build finished. A fixture imported by another test module is a second fixture of the same
    name to pytest: it finds the first one's directory here instead of building it again."""
    base = os.environ.get("CKDIFF_PRODUCER_CACHE")
    if not base:
        key = (name, *keys)
        if key not in _BUILT:
            out = tmp_path_factory.mktemp(name) / "out"
            build(out)
            _BUILT[key] = out
        return _BUILT[key]
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode())
    for f in sorted(HERE.glob("*.py")):
        h.update(f.read_bytes())
    out = Path(base) / f"{name}-{h.hexdigest()[:16]}"
    if not out.is_dir():
        Path(base).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{name}-"))
        try:
            build(tmp / "out")
            os.replace(tmp / "out", out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def tiny_llama(out: Path, seed: int = 0, arch: str = "Llama", **over) -> Path:
    """A tiny transformers ``LlamaForCausalLM`` (or ``{arch}ForCausalLM`` of another family) saved by
    ``save_pretrained``: GQA (8 heads, 2 KV heads), random weights and random norms (never constant),
    untied head, odd vocab."""
    import torch
    import transformers
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
              intermediate_size=96, vocab_size=100, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    kw.update(over)
    torch.manual_seed(seed)
    m = getattr(transformers, f"{arch}ForCausalLM")(getattr(transformers, f"{arch}Config")(**kw))
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.2 * torch.randn_like(p))
    m.save_pretrained(out)
    return out


def tiny_mixtral(out: Path, seed: int = 0) -> Path:
    """A tiny transformers ``MixtralForCausalLM``: 4 experts, top-2, GQA."""
    return tiny_llama(out, seed, "Mixtral", intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)


LLAMA_CPP_PYTHON = "0.3.36"  # the sdist .ci/run fetches


def llama_cpp_dir() -> Path:
    """llama.cpp's tree inside the llama-cpp-python sdist .ci/run unpacks: $CKDIFF_LLAMA_CPP, else the
    cache dir .ci/run uses by default. Missing: the test fails (CI always has it)."""
    env = os.environ.get("CKDIFF_LLAMA_CPP")
    cache = Path(os.environ.get("CKDIFF_PRODUCERS_DIR") or
                 Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ckdiff-producers")
    d = Path(env) if env else cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not (d / "convert_hf_to_gguf.py").is_file():
        raise AssertionError(f"llama.cpp's convert_hf_to_gguf.py not found in {d}: .ci/run fetches it (pip download "
                             f"--no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON}); set CKDIFF_LLAMA_CPP")
    return d


def sentencepiece_tokenizer(out_dir: Path, vocab: int) -> Path:
    """A tokenizer.model of ``vocab`` pieces trained by sentencepiece on a fixed text (llama.cpp's
    converter needs a tokenizer; its pieces do not matter to the weights)."""
    import sentencepiece as spm
    text = out_dir / "spm.txt"
    text.write_text(("the quick brown fox jumps over the lazy dog. " * 40 + " ".join("abcdefghijklmnopqrstuvwxyz")
                     + " 0 1 2 3 4 5 6 7 8 9\n") * 3)
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
                                   hard_vocab_limit=False, num_threads=1)
    text.unlink()
    (out_dir / "tokenizer.vocab").unlink()
    return out_dir / "tokenizer.model"


def gguf_converted(tmp_path_factory, name: str, sources, *keys: str, then=None) -> Path:
    """GGUF files written by llama.cpp's own converter (tests/producers/gguf_convert.py), built once per session
    by ``cached``. ``sources(out)`` writes the tiny HF sources under ``out`` and returns the converter's items
    (``HF_DIR:OUTTYPE:OUTFILE[:spm][:split=N]``); every source named by an item gets a sentencepiece tokenizer of
    100 pieces (the converter needs one; its pieces do not matter to the weights), then one converter process
    runs all items, then ``then(out)`` if given. ``keys``: more cache keys (a test module that makes its sources
    itself passes its own text)."""
    conv = llama_cpp_dir()

    def build(out):
        out.mkdir(parents=True)
        tok = sentencepiece_tokenizer(out, 100)
        items = list(sources(out))
        for hf in dict.fromkeys(item.split(":")[0] for item in items):
            shutil.copy(tok, Path(hf) / "tokenizer.model")
        launch(HERE / "gguf_convert.py", 1, conv, *items)
        if then is not None:
            then(out)
    return cached(tmp_path_factory, name, build, LLAMA_CPP_PYTHON, str(conv), *keys)


def edit_gguf(src: Path, dst: Path, edit) -> Path:
    """``src`` copied to ``dst`` and opened in place with gguf-py's ``GGUFReader(..., "r+")``: ``edit(reader)``
    changes tensor bytes or field parts in the mapped file, which is then flushed (as a converter with that bug
    would have written it)."""
    import gguf
    if Path(src) != Path(dst):
        shutil.copy(src, dst)
    r = gguf.GGUFReader(str(dst), "r+")
    edit(r)
    r.data.flush()
    del r
    return dst


def edit_gguf_tensors(src: Path, dst: Path, edit) -> Path:
    """``edit_gguf`` with ``edit({tensor name: its mapped data})``."""
    return edit_gguf(src, dst, lambda r: edit({t.name: t.data for t in r.tensors}))


def llama_permute(w, heads: int):
    """llama.cpp's LlamaModel.permute of q/k rows: HF's half split -> interleaved pairs per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_unpermute(w, heads: int):
    """The reverse of ``llama_permute``: interleaved pairs per head -> HF's half split."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def swap_tensors(a: str, b: str):
    """An ``edit_gguf_tensors`` edit: tensors ``a`` and ``b`` (same shape and type) swapped."""
    import numpy as np

    def edit(t):
        x = np.array(t[a])
        t[a][...] = t[b]
        t[b][...] = x
    return edit
