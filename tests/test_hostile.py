"""Broken and hostile inputs: exit 2, one line naming the file and the problem, nothing executed or written."""
import errno
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ckdiff.converters.formats import open_checkpoint
from ckdiff.errors import CkdiffError
from ckdiff.golden.emit import emit

FUZZ = int(os.environ.get("CKDIFF_FUZZ_EXAMPLES", "150"))


def _st(tmp_path, name="m.safetensors"):
    from safetensors.torch import save_file
    p = tmp_path / name
    save_file({"a": torch.randn(4, 8), "b": torch.randn(16)}, p)
    return p


def _rewrite_header(p, fn):
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    hdr = json.loads(raw[8:8 + n])
    hdr = fn(hdr)
    new = json.dumps(hdr).encode()
    p.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _expect_2(run_cli, *args, words=()):
    code, out, err = run_cli(*args)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckdiff: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


class Canary:
    """Unpickling an instance would create ``path``: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


CASES = {}


def case(f):
    CASES[f.__name__] = f
    return f


@case
def truncated(tmp_path):
    p = _st(tmp_path)
    p.write_bytes(p.read_bytes()[:-20])
    return p, ["m.safetensors", "truncated or corrupt"]


@case
def header_beyond_file(tmp_path):
    p = _st(tmp_path)
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(raw) * 4) + raw[8:])
    return p, ["header length", "exceeds the file size"]


@case
def invalid_json(tmp_path):
    p = _st(tmp_path)
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    p.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
    return p, ["invalid safetensors header", "invalid JSON"]


@case
def out_of_range_offsets(tmp_path):
    p = _st(tmp_path)
    _rewrite_header(p, lambda h: {**h, "a": {**h["a"], "data_offsets": [0, 10 ** 9]}})
    return p, ["'a'", "outside the data"]


@case
def overlapping_offsets(tmp_path):
    p = _st(tmp_path)

    def f(h):
        h["b"]["data_offsets"] = [64, 128]
        return h
    _rewrite_header(p, f)
    return p, ["overlap"]


@case
def unknown_dtype(tmp_path):
    p = _st(tmp_path)
    _rewrite_header(p, lambda h: {**h, "a": {**h["a"], "dtype": "Q7"}})
    return p, ["unknown dtype 'Q7'"]


@case
def index_missing_shard(tmp_path):
    d = emit(tmp_path / "hf", "llama-gqa", "hf", shards=3)
    (d / "model-00002-of-00003.safetensors").unlink()
    return d, ["model.safetensors.index.json", "model-00002-of-00003.safetensors", "missing"]


@case
def index_escapes_directory(tmp_path):
    d = emit(tmp_path / "hf", "llama-gqa", "hf", shards=2)
    shutil.copy(d / "model-00001-of-00002.safetensors", tmp_path / "outside.safetensors")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"] = {k: ("../outside.safetensors" if v.startswith("model-00001") else v)
                         for k, v in idx["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    return d, ["escapes the checkpoint directory"]


@case
def megatron_iteration_points_nowhere(tmp_path):
    d = emit(tmp_path / "meg", "llama-gqa", "megatron")
    (d / "latest_checkpointed_iteration.txt").write_text("2000")
    return d, ["latest_checkpointed_iteration.txt", "iter_0002000", "does not exist"]


@case
def megatron_tp_shapes_disagree(tmp_path):
    d = emit(tmp_path / "meg", "llama-gqa", "megatron", tp=2)
    f = d / "release/mp_rank_01/model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    tr = obj["model"]["language_model"]["transformer"]
    tr["layers.0.attention.dense.weight"] = tr["layers.0.attention.dense.weight"][:, :-1].clone()
    torch.save(obj, f)
    return d, ["mp_rank_01", "TP shards disagree in shape", "dense.weight"]


@case
def meta_missing_shard(tmp_path):
    d = emit(tmp_path / "meta", "llama-gqa", "meta", shards=2)
    (d / "consolidated.01.pth").unlink()
    (d / "consolidated.02.pth").write_bytes((d / "consolidated.00.pth").read_bytes())
    return d, ["consolidated.01.pth is missing"]


@case
def empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", ["empty directory"]


@case
def wrong_format(tmp_path):
    p = tmp_path / "weights.safetensors"
    p.write_bytes(b"PK\x03\x04 this is not safetensors at all")
    return p, ["weights.safetensors"]


@case
def plain_pickle_runs_code(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    p.write_bytes(pickle.dumps({"w": Canary(tmp_path / "CANARY")}))
    return p, ["refused to unpickle", "--trust-pickle"]


@case
def torch_zip_runs_code(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2)}, p)
    with zipfile.ZipFile(p) as z:
        items = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in items if n.endswith("data.pkl"))
    items[pkl] = pickle.dumps({"w": Canary(tmp_path / "CANARY")}, protocol=2)
    with zipfile.ZipFile(p, "w") as z:
        for n, b in items.items():
            z.writestr(n, b)
    return p, ["refused to unpickle"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exit_2_one_line(tmp_path, run_cli, name):
    bad, words = CASES[name](tmp_path)
    good = emit(tmp_path / "good", "llama-gqa", "hf")
    before = sorted(p.name for p in tmp_path.iterdir())
    _expect_2(run_cli, "inspect", bad, words=[*words])
    _expect_2(run_cli, good, bad)
    assert not (tmp_path / "CANARY").exists(), "unpickling ran code"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    # --debug shows the traceback instead
    code, _, err = run_cli("inspect", bad, "--debug")
    assert code == 2 and "Traceback" in err


def test_converters_write_nothing_on_bad_input(tmp_path, run_cli):
    meg = CASES["megatron_tp_shapes_disagree"](tmp_path)[0]
    _expect_2(run_cli, "convert", "megatron-to-hf", "--input_dir", meg, "--output_dir", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.ckdiff-tmp-*"))
    f = tmp_path / "afile"
    f.write_text("x")
    _expect_2(run_cli, "convert", "megatron-to-hf", "--input_dir", f, "--output_dir", tmp_path / "out2")
    _expect_2(run_cli, "convert", "to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir",
              CASES["plain_pickle_runs_code"](tmp_path)[0].parent, "--output_checkpoint_dir", tmp_path / "o3")
    assert not (tmp_path / "CANARY").exists()


def test_unreadable_file(tmp_path, run_cli, monkeypatch):
    p = _st(tmp_path)
    real_open = os.open

    def deny(path, *a, **k):  # as root, chmod would not stop the read
        if str(path) == str(p):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr("os.open", deny)
    _expect_2(run_cli, "inspect", p, words=["m.safetensors", "cannot read", "permission denied"])


def test_trust_pickle_is_an_explicit_opt_in(tmp_path):
    p = tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(3), "note": Canary(tmp_path / "CANARY")}, p)
    with pytest.raises(CkdiffError, match="refused to unpickle"):
        open_checkpoint(str(p))
    assert not (tmp_path / "CANARY").exists()
    ck = open_checkpoint(str(p), trust_pickle=True)  # the named opt-in: this is exactly what it allows
    assert list(ck.tensors) == ["w"] and (tmp_path / "CANARY").exists()


def test_nan_and_inf_are_reported(tmp_path, run_cli):
    from safetensors.torch import save_file
    a = torch.tensor([1.0, float("nan"), float("inf"), 4.0])
    save_file({"x": a}, tmp_path / "a.safetensors")
    save_file({"x": a}, tmp_path / "same.safetensors")
    b = a.clone()
    b[3] = float("nan")
    save_file({"x": b}, tmp_path / "b.safetensors")
    assert run_cli(tmp_path / "a.safetensors", tmp_path / "same.safetensors")[0] == 0  # NaN == NaN, same place
    code, out, _ = run_cli(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--json", tmp_path / "r.json")
    t = json.loads((tmp_path / "r.json").read_text())["result"]["tensors"][0]
    assert code == 1 and (t["nan_a"], t["nan_b"], t["inf_a"], t["inf_b"]) == (1, 2, 1, 1) and t["max_abs"] == "inf"
    assert "nan 1/2" in out


def test_full_disk_gives_clean_error_and_no_output(tmp_path, run_cli, monkeypatch):
    from ckdiff.converters import safetensors_io
    src = emit(tmp_path / "hf", "llama-gqa", "hf")
    real = safetensors_io.write_safetensors

    def full(path, tensors, metadata=None):
        real(path, list(tensors)[:2], metadata)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("ckdiff.converters.writers.write_safetensors", full)
    _expect_2(run_cli, "convert", "to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir", src,
              "--output_checkpoint_dir", tmp_path / "out", words=["no space left on device"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


KILL_SCRIPT = r"""
import os, signal, sys, torch
from ckdiff.converters import writers, megatron
n = int(sys.argv[1]); count = [0]
def hook(orig):
    def f(*a, **k):
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(*a, **k)
    return f
torch.save = hook(torch.save)
writers.write_safetensors = hook(writers.write_safetensors)
writers.write_json = hook(writers.write_json)
from ckdiff.cli import main
sys.exit(main(sys.argv[2:]))
"""


KILL_RUNS = {
    "megatron": ("megatron", ["hf-to-megatron", "llama2", "--model-path", "{src}", "--out", "{out}", "--tp", "2",
                              "--pp", "2", "--overwrite"]),
    "jetstream": ("jetstream", ["to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir", "{src}",
                                "--output_checkpoint_dir", "{out}", "--overwrite"]),
}


@pytest.mark.parametrize("target,kill_at", [("megatron", k) for k in range(1, 6)] + [("jetstream", 1), ("jetstream", 2)])
def test_sigkill_never_leaves_valid_looking_output(tmp_path, target, kill_at):
    src = emit(tmp_path / "hf", "llama-gqa", "hf")
    layout, argv = KILL_RUNS[target]
    old = emit(tmp_path / "out", "llama-gqa", layout)  # an existing output replaced with --overwrite
    before = {p.name: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    argv = [a.format(src=src, out=old) for a in argv]
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(kill_at), "convert", *argv],
                       capture_output=True, text=True, timeout=120)
    if r.returncode == -signal.SIGKILL:
        # killed mid-write: the old output is untouched, nothing new claims to be a checkpoint
        assert {p.name: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
        for tmp in tmp_path.glob(".out.ckdiff-tmp-*"):
            assert not (tmp / "latest_checkpointed_iteration.txt").exists() and not (tmp / "params.json").exists()
    else:
        assert r.returncode == 0, r.stderr  # finished before the kill point: a complete output
        open_checkpoint(str(old))


def _fuzz_settings():
    return settings(max_examples=FUZZ, deadline=None, suppress_health_check=list(HealthCheck),
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])


@pytest.fixture(scope="module")
def megatron_seed(tmp_path_factory):
    meg = emit(tmp_path_factory.mktemp("fzmeg") / "meg", "llama-gqa", "megatron")
    return meg, (meg / "release/mp_rank_00/model_optim_rng.pt").read_bytes()


@pytest.fixture(scope="module")
def sharded_hf(tmp_path_factory):
    return emit(tmp_path_factory.mktemp("fzhf") / "hf", "llama-gqa", "hf", shards=2)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    d = tmp_path_factory.mktemp("seeds")
    return {"st": _st(d).read_bytes(), "pt": _pt_bytes(d), "index": (emit(d / "hf", "llama-gqa", "hf", shards=2)
                                                                    / "model.safetensors.index.json").read_bytes()}


def _pt_bytes(d):
    torch.save({"a": torch.randn(3, 4), "b": {"c": torch.arange(5)}}, d / "x.pt")
    return (d / "x.pt").read_bytes()


def _mutate(data: bytes, edits):
    b = bytearray(data)
    for pos, val, cut in edits:
        if cut and len(b) > 1:
            del b[pos % len(b):]
        elif b:
            b[pos % len(b)] = val
    return bytes(b)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255), st.booleans()), min_size=1, max_size=6)


@_fuzz_settings()
@given(edits=EDITS)
def test_fuzz_safetensors_reader(tmp_path_factory, seeds, edits):
    p = tmp_path_factory.mktemp("fz") / "f.safetensors"
    p.write_bytes(_mutate(seeds["st"], edits))
    try:
        ck = open_checkpoint(str(p))
        for t in ck.tensors.values():
            t.load()
    except CkdiffError:
        pass


@_fuzz_settings()
@given(edits=EDITS)
def test_fuzz_pickle_reader(tmp_path_factory, seeds, edits):
    d = tmp_path_factory.mktemp("fz")
    p = d / "f.pt"
    p.write_bytes(_mutate(seeds["pt"], edits))
    try:
        open_checkpoint(str(p))
    except CkdiffError:
        pass
    assert not (d / "CANARY").exists()


@_fuzz_settings()
@given(text=st.one_of(st.text(max_size=200), st.builds(
    lambda m, k, v: json.dumps({"weight_map": {k: v}} if m else [k, v]), st.booleans(), st.text(max_size=30),
    st.text(max_size=30))))
def test_fuzz_index_reader(sharded_hf, text):
    src = sharded_hf
    (src / "model.safetensors.index.json").write_text(text)
    try:
        open_checkpoint(str(src))
    except CkdiffError:
        pass


@_fuzz_settings()
@given(edits=EDITS, tracker=st.sampled_from(["release", "0", "-3", "abc", "", "1000", "release\n"]))
def test_fuzz_megatron_reader(megatron_seed, edits, tracker):
    meg, raw = megatron_seed
    (meg / "latest_checkpointed_iteration.txt").write_text(tracker)
    f = meg / "release/mp_rank_00/model_optim_rng.pt"
    f.write_bytes(_mutate(raw, edits))
    try:
        ck = open_checkpoint(str(meg))
        for t in ck.tensors.values():
            t.load()
    except CkdiffError:
        pass


def test_mangled_zip_directory_regression(tmp_path, seeds):
    """Found by the fuzzer: zipfile.is_zipfile itself raised BadZipFile on a corrupted end record
    (torch's own reader still reads the file, without mmap)."""
    p = tmp_path / "f.pt"
    p.write_bytes(_mutate(seeds["pt"], [(51472, 1, False)]))
    assert sorted(open_checkpoint(str(p)).tensors) == ["a", "b.c"]


def test_report_never_overwrites_an_input(tmp_path, run_cli):
    a = _st(tmp_path, "a.safetensors")
    b = _st(tmp_path, "b.safetensors")
    before = a.read_bytes()
    _expect_2(run_cli, a, b, "--json", a, words=["--json", "file of an input checkpoint"])
    assert a.read_bytes() == before
