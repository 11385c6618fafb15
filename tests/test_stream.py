"""Streamed writers: torch's zip format tensor by tensor, bounded memory, mmap reads."""
import argparse
import collections
import re
import weakref
import zipfile

import pytest
import torch

from ckdiff.formats.readers import open_checkpoint
from ckdiff.tensor.lazy import EagerTensor, LazyTensor
from ckdiff.tensor.ops import ShardMerge
from ckdiff.io.pickles import load_pickle
from ckdiff.io.torch_zip import TensorSource, write_torch_zip
from helpers import convert

SAFE_GLOBALS = [argparse.Namespace]  # what torch.load(weights_only=True), the oracle here, needs for rank files


def _records(path):
    z = zipfile.ZipFile(path)
    assert z.testzip() is None  # every CRC-32 checks
    return {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"iteration": "release", "checkpoint_version": 3.0,
            "args": argparse.Namespace(num_layers=2, hidden_size=24, glu_activation="swiglu"),
            "model": {"language_model": {
                "embedding": {"word_embeddings.weight": torch.randn(37, 24, generator=g).bfloat16()},
                "transformer": {"layers.0.attention.query_key_value.weight": torch.randn(72, 24, generator=g),
                                "layers.0.input_layernorm.weight": torch.randn(24, generator=g).half(),
                                "final_layernorm.weight": torch.randn(24, generator=g).double()}},
                "ids": torch.randint(-5, 5, (3, 7), generator=g), "scalar": torch.tensor(2.5)}}


def _streamed(obj, chunk_bytes):
    if isinstance(obj, dict):
        return {k: _streamed(v, chunk_bytes) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor) and obj.dim():
        return TensorSource.rows_of(EagerTensor("t", obj), chunk_bytes=chunk_bytes)
    return obj


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix: obj}


@pytest.mark.parametrize("chunk_bytes", [1, 100, 1 << 20])
def test_streamed_file_is_what_torch_save_writes(tmp_path, chunk_bytes):
    state = _state()
    torch.save(state, tmp_path / "ref.pt")
    write_torch_zip(tmp_path / "ref_s.pt", _streamed(state, chunk_bytes))
    ref, got = _records(tmp_path / "ref.pt"), _records(tmp_path / "ref_s.pt")
    ref.pop(".data/serialization_id")  # random per save
    assert ref == got  # the same pickle, the same storage keys and bytes, the same markers
    for mmap in (False, True):
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            back = torch.load(tmp_path / "ref_s.pt", weights_only=True, mmap=mmap)
        a, b = _flat(state), _flat(back)
        assert a.keys() == b.keys()
        for k, v in a.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k
            else:
                assert v == b[k], k
    reader = torch._C.PyTorchFileReader(open(tmp_path / "ref_s.pt", "rb"))
    assert all(reader.get_record_offset(r) % 64 == 0 for r in reader.get_all_records())


def test_announced_size_is_checked(tmp_path):
    bad = TensorSource((4, 3), torch.float32, lambda: [torch.zeros(3, 3)], "w")
    with pytest.raises(RuntimeError, match="announced"):
        write_torch_zip(tmp_path / "x.pt", {"w": bad})


def test_megatron_rank_files_equal_torch_save_of_their_content(tiny_hf, tmp_path):
    src = tiny_hf("llama-gqa", "bfloat16")
    assert convert("hf-to-megatron", "llama2", "--model-path", src, "--out", tmp_path / "meg", "--tp", 2, "--pp", 2) == 0
    files = sorted((tmp_path / "meg" / "release").glob("mp_rank_*/model_optim_rng.pt"))
    assert len(files) == 4
    for f in files:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(f, weights_only=True)
        assert obj["iteration"] == "release" and obj["checkpoint_version"] == 3.0
        assert isinstance(obj["args"], argparse.Namespace) and obj["args"].tensor_model_parallel_size == 2
        torch.save(obj, tmp_path / "resaved.pt")
        ref, got = _records(tmp_path / "resaved.pt"), _records(f)
        ref.pop(".data/serialization_id")
        assert ref == got, f


class _Tracked(LazyTensor):
    """Counts the tensors it has handed out that are still alive."""

    alive = 0
    peak = 0
    names: collections.Counter = collections.Counter()
    check = None  # called with the names of the live tensors at each hand-out

    def __init__(self, base: LazyTensor):
        super().__init__(base.name, base.shape, base.dtype, base.origin)
        self.base = base

    def _hand_out(self, t):
        cls = _Tracked
        t = t.clone()  # a tensor of its own, so that its lifetime is what is counted
        cls.alive += 1
        cls.names[self.name] += 1
        cls.peak = max(cls.peak, cls.alive)
        weakref.finalize(t, cls._gone, self.name)
        if cls.check:
            cls.check(+cls.names)
        return t

    @staticmethod
    def _gone(name):
        _Tracked.alive -= 1
        _Tracked.names[name] -= 1

    def load(self):
        return self._hand_out(self.base.load())

    def rows(self, a, b):
        return self._hand_out(self.base.rows(a, b))


def test_megatron_writer_holds_one_chunk_not_a_rank(tiny_hf, tmp_path):
    from ckdiff.convert.api import read_source
    from ckdiff.formats.layouts import convert as layout_convert
    from ckdiff.formats.megatron_llm import make_args, write_megatron
    ck, cfg = read_source(str(tiny_hf("llama-gqa")))
    tensors = {k: _Tracked(t) for k, t in layout_convert(ck.tensors, "hf", "megatron", cfg).items()}
    assert len(tensors) > 10
    _Tracked.alive = _Tracked.peak = 0
    done, totals = [], []
    write_megatron(tmp_path, tensors, cfg, 2, 1, make_args(cfg, "llama2", 2, 1, cfg.vocab, cfg.vocab, 128),
                   progress_factory=lambda total: totals.append(total) or done.append)
    assert _Tracked.alive == 0
    assert _Tracked.peak <= 2, _Tracked.peak  # one chunk (and the next being read), never a rank's tensors
    files = list(tmp_path.glob("release/mp_rank_*/model_optim_rng.pt"))
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        written = sum(t.nbytes for f in files for t in _flat(torch.load(f, weights_only=True)).values()
                      if isinstance(t, torch.Tensor))
    assert totals == [written] and sum(done) == written  # every byte announced and reported once


def _mapped_from(addr):
    """The file mapped at address ``addr`` in this process (Linux /proc/self/maps), or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return parts[5] if len(parts) > 5 else None
    return None


def test_rank_files_load_memory_mapped_and_tp_merges_read_rows(tiny_hf, tmp_path):
    src = tiny_hf("llama-gqa")
    assert convert("hf-to-megatron", "llama2", "--model-path", src, "--out", tmp_path / "meg", "--tp", 2) == 0
    ck = open_checkpoint(str(tmp_path / "meg"))
    qkv = ck.tensors["language_model.encoder.layers.0.self_attention.query_key_value.weight"]
    parts = qkv.group.inputs  # the TP merge (ShardMerge of megatron.TP_TABLE) over the two rank shards
    assert isinstance(qkv.group.fn, ShardMerge) and len(parts) == 2
    for p in parts:
        assert _mapped_from(p._t.data_ptr()) == p.origin  # bytes come from the file on demand
    whole = qkv.load()
    n = parts[0].shape[0]
    assert torch.equal(qkv.rows(n - 3, n + 2), whole[n - 3:n + 2])
    # a legacy (non-zip) pickle still loads, without a memory map
    torch.save({"w": torch.randn(3, 4)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    assert load_pickle(tmp_path / "legacy.bin")["w"].shape == (3, 4)


def _whole_weights(monkeypatch):
    """The runtimes as they were: every weight read whole (the streamed reads must not change a bit)."""
    from ckdiff.runtime import forward as runtimes
    monkeypatch.setattr(runtimes.Weights, "gather", lambda W, k, ids: W(k)[ids])
    monkeypatch.setattr(runtimes.Weights, "matmul_t", lambda W, k, x: x @ W(k).T)


@pytest.mark.parametrize("name,model", [("llama-gqa", "llama2"), ("falcon-40b", "falcon")])
def test_logits_hold_one_layer_and_equal_whole_weight_runs(tiny_hf, tmp_path, monkeypatch, name, model):
    from ckdiff.compare.logits import compare_logits
    from ckdiff.models.config import model_config
    src = tiny_hf(name)
    assert convert("hf-to-megatron", model, "--model-path", src, "--out", tmp_path / "meg", "--tp", 2) == 0
    a, b = open_checkpoint(str(src)), open_checkpoint(str(tmp_path / "meg"))
    for ck in (a, b):
        ck.tensors = {k: _Tracked(v) for k, v in ck.tensors.items()}
    seen = []

    def one_layer(live):
        layers = {m.group(1) for n in live for m in [re.search(r"(?:layers|\.h)\.(\d+)\.", n)] if m}
        others = [n for n in live if not re.search(r"(?:layers|\.h)\.\d+\.", n)]
        seen.append(len(layers))
        assert len(layers) <= 1, sorted(live)  # one layer's weights at a time, over both sides
        assert not (layers and others), sorted(live)  # no embedding / head kept while layers run
    _Tracked.check = one_layer
    try:
        small = LazyTensor.row_chunks
        monkeypatch.setattr(LazyTensor, "row_chunks", lambda t, chunk_bytes=0: small(t, 4096))
        streamed = compare_logits(a, b, batch=2, length=12, seed=3)
    finally:
        _Tracked.check = None
    assert max(seen) == 1
    assert b.tensors["language_model.embedding.word_embeddings.weight"].nbytes > 4 * 4096  # the head went in chunks
    _whole_weights(monkeypatch)
    whole = compare_logits(a, b, batch=2, length=12, seed=3)
    got, want = streamed.to_dict(), whole.to_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        if k == "max_abs":  # a difference of two logits: one float32 ulp of a logit (~1e-7 here) may move it
            assert abs(got[k] - v) <= 1e-6, (k, got[k], v)
        elif isinstance(v, float):  # a head read in 16-row chunks may round the last bit of a logit differently
            assert abs(got[k] - v) <= 1e-12 + 1e-6 * abs(v), (k, got[k], v)
        elif k == "token_kl":  # the per-token KL picture, likewise
            assert all(abs(x - y) <= 1e-12 + 1e-2 * abs(y) for ra, rb in zip(got[k], v) for x, y in zip(ra, rb))
        elif k == "worst_topk":  # the top-k table at the worst token: same ids, log-probs to rounding
            assert {n: x for n, x in got[k].items() if n.endswith("ids")} == \
                {n: x for n, x in v.items() if n.endswith("ids")}
            assert all(abs(x - y) <= 1e-6 * abs(y) for n in v if n.endswith("logprob") for x, y in zip(got[k][n], v[n]))
        elif k in ("signals", "noise_floor"):  # the judged signals: names and verdicts the same, values to rounding
            def close(n, x, y):  # a ratio (observed / limit) is dimensionless: 1e-6 of a limit is rounding
                return abs(x - y) <= (1e-6 if n == "ratio" else 1e-12) + 1e-2 * abs(y) if isinstance(y, float) else x == y
            rows = [(got[k], v)] if isinstance(v, dict) else list(zip(got[k], v))
            assert len(got[k]) == len(v) and all(ra.keys() == rb.keys() and all(close(n, ra[n], rb[n]) for n in rb)
                                                 for ra, rb in rows), (k, got[k], v)
        elif k == "max_abs_at" and want["max_abs"] < 1e-5:
            continue  # where the largest of rounding-level differences lies is itself a matter of rounding
        else:  # verdict, locations, top-k, per-layer hidden errors: the same exactly
            assert got[k] == v, (k, got[k], v)
    monkeypatch.undo()  # default chunks: a tiny head is one chunk, and then not one bit may move
    assert compare_logits(a, b, batch=2, length=12, seed=3).to_dict() == want
    assert len(streamed.layer_rel_errors) == model_config(a).layers > 1


def test_logits_and_hf_writer_report_progress(tiny_hf, tmp_path):
    from ckdiff.compare.logits import compare_logits
    from ckdiff.io.writers import write_hf
    src = tiny_hf("llama-gqa")
    a = open_checkpoint(str(src))
    calls = []

    def factory(total):
        calls.append(["total", total])

        def step(n):
            calls.append(n)
        step.stop = lambda: calls.append("stop")
        return step
    compare_logits(a, a, batch=1, length=4, progress_factory=factory)
    assert calls[0] == ["total", 2 * a.num_bytes] and calls[-1] == "stop"
    assert sum(calls[1:-1]) >= 2 * a.num_bytes - 2 * a.tensors["model.embed_tokens.weight"].nbytes
    calls.clear()
    write_hf(tmp_path, a.tensors, {}, 2, progress_factory=factory)
    assert calls[0] == ["total", a.num_bytes] and calls[-1] == "stop" and sum(calls[1:-1]) == a.num_bytes


def test_lazy_conversion_infers_shapes_without_torch_dynamo(tiny_hf):
    """Meta-device cat/stack import torch._dynamo and sympy (~66 MiB RssAnon); the ops avoid them."""
    import subprocess
    import sys
    code = ("import sys\n"
            "from ckdiff.convert.api import read_source\n"
            "from ckdiff.formats.layouts import convert\n"
            f"ck, cfg = read_source({str(tiny_hf('llama-gqa'))!r})\n"
            "out = convert(ck.tensors, 'hf', 'megatron', cfg, ck.path)\n"
            "assert out['language_model.encoder.layers.0.self_attention.query_key_value.weight'].shape[0] == "
            "cfg.q_rows + 2 * cfg.kv_rows\n"
            "print('torch._dynamo' in sys.modules)\n")
    import os
    from pathlib import Path

    import ckdiff
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(ckdiff.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
