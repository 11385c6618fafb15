"""Broken and hostile inputs: exit 2, one line naming the file and the problem, nothing executed or written."""
import errno
import math
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

from ckdiff.formats.readers import open_checkpoint
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
    from ckdiff.io import safetensors as safetensors_io
    src = emit(tmp_path / "hf", "llama-gqa", "hf")
    real = safetensors_io.write_safetensors

    def full(path, tensors, metadata=None):
        real(path, list(tensors)[:2], metadata)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("ckdiff.io.writers.write_safetensors", full)
    _expect_2(run_cli, "convert", "to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir", src,
              "--output_checkpoint_dir", tmp_path / "out", words=["no space left on device"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


KILL_SCRIPT = r"""
import os, signal, sys, torch
from ckdiff.io import writers
from ckdiff.formats import megatron_llm as megatron
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
    """Found by the fuzzer: zipfile.is_zipfile itself raised BadZipFile on a corrupted end record.
    The restricted reader parses the archive with zipfile, which refuses the record: one error
    naming the file (torch's own reader happened to read past the damage)."""
    from ckdiff.errors import InputError
    p = tmp_path / "f.pt"
    p.write_bytes(_mutate(seeds["pt"], [(51472, 1, False)]))
    with pytest.raises(InputError, match="f.pt: not a readable torch checkpoint"):
        open_checkpoint(str(p))


def test_report_never_overwrites_an_input(tmp_path, run_cli):
    a = _st(tmp_path, "a.safetensors")
    b = _st(tmp_path, "b.safetensors")
    before = a.read_bytes()
    _expect_2(run_cli, a, b, "--json", a, words=["--json", "file of an input checkpoint"])
    assert a.read_bytes() == before


# ============================================================== round two: the hostile-input suite
# Each builder makes one hostile input under ``d`` and returns (ckdiff argv, words the error line must hold).
# test_hostile_suite runs them all (and the CASES above) and counts how many end cleanly.

HOSTILE = {}


def hostile(f):
    HOSTILE[f.__name__] = f
    return f


def _hf_fifo(d, name):
    src = emit(d / "hf", "llama-gqa", "hf")
    (src / name).unlink()
    os.mkfifo(src / name)
    return src


def _header_file(d, header, data=b"", name="h.safetensors", raw=None):
    raw = json.dumps(header).encode() if raw is None else raw
    p = d / name
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return p


def _entry(shape=(2, 2), offsets=(0, 16), dtype="F32", **extra):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}


# -- 2. hangs: every opened file is a regular file first
@hostile
def fifo_reached_by_glob(d):
    return ["inspect", _hf_fifo(d, "model.safetensors")], ["model.safetensors", "FIFO"]


@hostile
def fifo_as_megatron_tracker(d):
    meg = emit(d / "meg", "llama-gqa", "megatron")
    (meg / "latest_checkpointed_iteration.txt").unlink()
    os.mkfifo(meg / "latest_checkpointed_iteration.txt")
    return ["inspect", meg], ["latest_checkpointed_iteration.txt", "FIFO"]


@hostile
def fifo_as_meta_shard(d):
    meta = emit(d / "meta", "llama-gqa", "meta", shards=2)
    (meta / "consolidated.01.pth").unlink()
    os.mkfifo(meta / "consolidated.01.pth")
    return ["inspect", meta], ["consolidated.01.pth", "FIFO"]


@hostile
def fifo_as_index(d):
    src = emit(d / "hf", "llama-gqa", "hf", shards=2)
    (src / "model.safetensors.index.json").unlink()
    os.mkfifo(src / "model.safetensors.index.json")
    return ["inspect", src], ["model.safetensors.index.json", "FIFO"]


@hostile
def fifo_as_config(d):
    return ["inspect", _hf_fifo(d, "config.json")], ["config.json", "FIFO"]


@hostile
def fifo_as_argument(d):
    os.mkfifo(d / "w.safetensors")
    return ["inspect", d / "w.safetensors"], ["w.safetensors", "FIFO"]


@hostile
def device_behind_symlink(d):
    src = emit(d / "hf", "llama-gqa", "hf")
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to("/dev/zero")
    return ["inspect", src], ["model.safetensors", "character device"]


@hostile
def symlink_loop_argument(d):
    (d / "a.safetensors").symlink_to(d / "b.safetensors")
    (d / "b.safetensors").symlink_to(d / "a.safetensors")
    return ["inspect", d / "a.safetensors"], ["a.safetensors", "symbolic link loop"]


@hostile
def symlink_loop_in_glob(d):
    src = emit(d / "hf", "llama-gqa", "hf")
    (src / "extra.safetensors").symlink_to(src / "extra.safetensors")
    return ["inspect", src], ["extra.safetensors", "symbolic link loop"]


@hostile
def tracker_is_a_symlink_loop(d):
    meg = emit(d / "meg", "llama-gqa", "megatron")
    (meg / "latest_checkpointed_iteration.txt").unlink()
    (meg / "latest_checkpointed_iteration.txt").symlink_to(meg / "latest_checkpointed_iteration.txt")
    return ["inspect", meg], ["latest_checkpointed_iteration.txt", "symbolic link loop"]


@hostile
def dangling_symlink(d):
    (d / "w.safetensors").symlink_to(d / "gone.safetensors")
    return ["inspect", d / "w.safetensors"], ["w.safetensors", "missing"]


# -- 3. memory bombs in allowlisted pickles
def _expanded(n_rows=1 << 24):
    return torch.randn(256).expand(n_rows, 256)  # 1 KB of storage claiming 16 GiB


@hostile
def stride0_expand_pickle(d):
    torch.save({"w": _expanded(), "b": torch.randn(3)}, d / "bomb.pt")
    return ["inspect", d / "bomb.pt"], ["bomb.pt", "'w'", "reuses its storage"]


@hostile
def overlapping_strides_pickle(d):
    base = torch.randn(64)
    torch.save({"w": base.as_strided((33, 32), (1, 1))}, d / "bomb.pt")
    return ["inspect", d / "bomb.pt"], ["bomb.pt", "'w'", "reuses its storage"]


@hostile
def stride0_in_megatron_rank(d):
    meg = emit(d / "meg", "llama-gqa", "megatron")
    f = meg / "release/mp_rank_00/model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    tr = obj["model"]["language_model"]["transformer"]
    w = tr["layers.0.input_layernorm.weight"]
    tr["layers.0.input_layernorm.weight"] = torch.randn(1, dtype=w.dtype).expand(*w.shape)
    torch.save(obj, f)
    return ["inspect", meg], ["model_optim_rng.pt", "input_layernorm.weight", "reuses its storage"]


@hostile
def stride0_in_meta_shard(d):
    meta = emit(d / "meta", "llama-gqa", "meta")
    f = meta / "consolidated.00.pth"
    sd = torch.load(f)
    w = sd["norm.weight"]
    sd["norm.weight"] = torch.randn(1, dtype=w.dtype).expand(*w.shape)
    torch.save(sd, f)
    return ["inspect", meta], ["consolidated.00.pth", "norm.weight", "reuses its storage"]


# -- 4. shards that disagree in dtype
@hostile
def meta_shard_in_float64(d):
    meta = emit(d / "meta", "llama-gqa", "meta", dtype="bfloat16", shards=2)
    f = meta / "consolidated.01.pth"
    torch.save({k: v.double() for k, v in torch.load(f).items()}, f)
    return ["inspect", meta], ["consolidated.01.pth", "disagree in dtype", "float64", "bfloat16"]


@hostile
def megatron_tp_rank_in_float64(d):
    meg = emit(d / "meg", "llama-gqa", "megatron", tp=2)
    f = meg / "release/mp_rank_01/model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    tr = obj["model"]["language_model"]["transformer"]
    tr["layers.0.attention.dense.weight"] = tr["layers.0.attention.dense.weight"].double()
    torch.save(obj, f)
    return ["inspect", meg], ["mp_rank_01", "disagree in dtype", "float64"]


# -- 5. what used to be internal errors
DEEP = 100_000


@hostile
def deeply_nested_header(d):
    return ["inspect", _header_file(d, None, raw=b"[" * DEEP)], ["h.safetensors", "invalid safetensors header"]


@hostile
def deeply_nested_metadata(d):
    raw = b'{"__metadata__":' + b'{"a":' * DEEP + b'"x"' + b"}" * DEEP + b"}"
    return ["inspect", _header_file(d, None, raw=raw)], ["h.safetensors", "invalid safetensors header"]


@hostile
def deeply_nested_index(d):
    src = emit(d / "hf", "llama-gqa", "hf", shards=2)
    (src / "model.safetensors.index.json").write_text('{"weight_map":' + "[" * DEEP)
    return ["inspect", src], ["model.safetensors.index.json", "invalid JSON"]


@hostile
def deeply_nested_config(d):
    src = emit(d / "hf", "llama-gqa", "hf")
    (src / "config.json").write_text('{"a":' * DEEP + "1" + "}" * DEEP)
    return ["inspect", src], ["config.json", "nested too deeply"]


@hostile
def deeply_nested_params(d):
    meta = emit(d / "meta", "llama-gqa", "meta")
    (meta / "params.json").write_text("[" * DEEP + "]" * DEEP)
    return ["inspect", meta], ["params.json", "JSON"]


@hostile
def dtype_is_a_list(d):
    return ["inspect", _header_file(d, {"a": _entry(dtype=["F32"])}, b"\0" * 16)], ["h.safetensors", "'a'", "dtype"]


@hostile
def shape_overflows(d):
    hdr = {"a": _entry((1 << 40, 1 << 40, 0), (0, 0)), "b": _entry((4,), (0, 16))}
    return ["inspect", _header_file(d, hdr, b"\0" * 16)], ["h.safetensors", "'a'", "overflows"]


@hostile
def dimension_beyond_torch(d):
    hdr = {"a": _entry((1 << 63, 0), (0, 0)), "b": _entry((4,), (0, 16))}
    return ["inspect", _header_file(d, hdr, b"\0" * 16)], ["h.safetensors", "'a'", "exceeds"]


@hostile
def empty_tensor_beyond_torch(d):
    hdr = {"a": _entry((0, 1 << 62, 1 << 62), (0, 0)), "b": _entry((4,), (0, 16))}
    return ["inspect", _header_file(d, hdr, b"\0" * 16)], ["h.safetensors", "'a'", "exceeds what torch can index"]


@hostile
def tracker_of_thousands_of_digits(d):
    meg = emit(d / "meg", "llama-gqa", "megatron")
    (meg / "latest_checkpointed_iteration.txt").write_text("9" * 5000)
    return ["inspect", meg], ["latest_checkpointed_iteration.txt", "longer than"]


@hostile
def tracker_of_twenty_digits(d):
    meg = emit(d / "meg", "llama-gqa", "megatron")
    (meg / "latest_checkpointed_iteration.txt").write_text("9" * 20)
    return ["inspect", meg], ["latest_checkpointed_iteration.txt", "iteration number"]


@hostile
def file_name_too_long(d):
    return ["inspect", d / ("w" * 300 + ".safetensors")], ["www", "file name too long"]


@hostile
def index_names_a_too_long_shard(d):
    src = emit(d / "hf", "llama-gqa", "hf", shards=2)
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    idx["weight_map"] = {k: "x" * 400 + ".safetensors" for k in idx["weight_map"]}
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    return ["inspect", src], ["model.safetensors.index.json", "missing"]


# -- 6. the header schema is the format's (see also test_header_schema_matches_the_reference_reader)
SCHEMA_BREAKS = {
    "shape_string": {"a": _entry(shape="22")},
    "shape_float": {"a": _entry(shape=(2.0, 2))},
    "shape_bool": {"a": _entry(shape=(True, 2))},
    "shape_negative": {"a": _entry(shape=(-2, -2))},
    "offsets_float": {"a": _entry(offsets=(0.0, 16))},
    "offsets_three": {"a": _entry(offsets=(0, 16, 16))},
    "offsets_bool": {"a": _entry(offsets=(False, 16))},
    "metadata_list": {"__metadata__": ["x"], "a": _entry()},
    "metadata_int_value": {"__metadata__": {"k": 1}, "a": _entry()},
    "metadata_nested": {"__metadata__": {"k": {"x": "y"}}, "a": _entry()},
    "entry_missing_offsets": {"a": {"dtype": "F32", "shape": [2, 2]}},
    "entry_is_a_number": {"a": 7},
    "dtype_lowercase": {"a": _entry(dtype="f32")},
    "gap_in_data": {"a": _entry((2,), (8, 16))},
    "uncovered_tail": {"a": _entry((2,), (0, 8))},
}


def _schema_case(name, header):
    def build(d):
        return ["inspect", _header_file(d, header, b"\0" * 16)], ["h.safetensors"]
    build.__name__ = f"schema_{name}"
    return build


for _n, _h in SCHEMA_BREAKS.items():
    hostile(_schema_case(_n, _h))

RAW_BREAKS = {
    "repeated_field": b'{"a":{"dtype":"F32","dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}',
    "nan_in_extra_key": b'{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16],"x":NaN}}',
    "lone_surrogate_name": b'{"\\ud800":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}',
    "byte_order_mark": b'\xef\xbb\xbf{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}',
    "trailing_nul": b'{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}\0',
    "repeated_metadata": b'{"__metadata__":{},"__metadata__":{},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}',
}


def _raw_case(name, raw):
    def build(d):
        return ["inspect", _header_file(d, None, b"\0" * 16, raw=raw)], ["h.safetensors", "invalid safetensors header"]
    build.__name__ = f"raw_{name}"
    return build


for _n, _r in RAW_BREAKS.items():
    hostile(_raw_case(_n, _r))


# -- 7. control characters in names and paths
@hostile
def newline_and_escape_in_file_name(d):
    p = _st(d, "evil\n\x1b[2J\x1b]0;pwned\x07.safetensors")
    p.write_bytes(p.read_bytes()[:-20])
    return ["inspect", p], ["evil\\n\\x1b[2J", "truncated"]


@hostile
def escape_sequence_in_tensor_name(d):
    hdr = {"a\x1b[31m\r": _entry(dtype="Q7"), "b": _entry((2,), (16, 24))}
    return ["inspect", _header_file(d, hdr, b"\0" * 24)], ["h.safetensors", "a\\x1b[31m\\r", "unknown dtype"]


@hostile
def non_utf8_file_name(d):
    p = d / os.fsdecode(b"bad\xff.safetensors")
    p.write_bytes(b"1234")
    return ["inspect", p], ["bad\\udcff.safetensors", "shorter than"]


# -- 10. errors never print file contents
SECRET = "s3cr3t-TOKEN-" + "q" * 30


@hostile
def tracker_links_to_a_secret(d):
    meg = emit(d / "meg", "llama-gqa", "megatron")
    (d / "secret.txt").write_text(SECRET + "\n")
    (meg / "latest_checkpointed_iteration.txt").unlink()
    (meg / "latest_checkpointed_iteration.txt").symlink_to(d / "secret.txt")
    return ["inspect", meg], ["latest_checkpointed_iteration.txt", "iteration number"]


@hostile
def config_links_to_a_secret(d):
    src = emit(d / "hf", "llama-gqa", "hf")
    (d / "secret.txt").write_text(SECRET + "\n")
    (src / "config.json").unlink()
    (src / "config.json").symlink_to(d / "secret.txt")
    return ["inspect", src], ["config.json", "invalid JSON"]


@hostile
def pickle_that_is_a_secret(d):
    (d / "secret.pt").write_text(SECRET)
    return ["inspect", d / "secret.pt"], ["secret.pt", "not a torch zip or pickle"]


# -- outputs: a symlinked output directory is refused, its target untouched
@hostile
def output_is_a_symlink(d):
    src = emit(d / "hf", "llama-gqa", "hf")
    (d / "elsewhere").mkdir()
    (d / "elsewhere" / "keep.txt").write_text("keep")
    (d / "out").symlink_to(d / "elsewhere")
    return (["convert", "to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir", src,
             "--output_checkpoint_dir", d / "out", "--overwrite"], ["out", "symbolic link"])


# -- 1. reports never overwrite what they must not (one report-writing path for every format)
@hostile
def report_onto_an_input_config(d):
    a, b = emit(d / "a", "llama-gqa", "hf"), emit(d / "b", "llama-gqa", "hf")
    return [a, b, "--markdown", a / "config.json"], ["--markdown", "config.json", "file of an input"]


def _report_link_case(flag):
    def build(d):
        a = _st(d, "a.safetensors")
        (d / "elsewhere.txt").write_text("keep")
        (d / "r.link").symlink_to(d / "elsewhere.txt")
        return [a, a, f"--{flag}", d / "r.link"], [f"--{flag}", "r.link", "symbolic link", "--force"]
    build.__name__ = f"report_{flag}_onto_a_symlink"
    return build


for _f in ("json", "html", "markdown"):
    hostile(_report_link_case(_f))


@hostile
def report_forced_through_a_link_to_an_input(d):
    a, b = emit(d / "a", "llama-gqa", "hf"), emit(d / "b", "llama-gqa", "hf")
    (d / "r.md").symlink_to(a / "config.json")
    return [a, b, "--markdown", d / "r.md", "--force"], ["r.md", "file of an input"]


@hostile
def report_forced_through_a_link_into_an_input_file(d):
    a = _st(d, "a.safetensors")
    (d / "r.json").symlink_to(d / "a.safetensors")
    return [a, a, "--json", d / "r.json", "--force"], ["r.json", "file of an input"]


@hostile
def report_into_a_missing_directory(d):
    a = _st(d, "a.safetensors")
    return [a, a, "--html", d / "nodir" / "r.html"], ["--html", "nodir", "does not exist"]


@hostile
def report_onto_a_directory(d):
    a = _st(d, "a.safetensors")
    (d / "sub").mkdir()
    return [a, a, "--json", d / "sub"], ["--json", "sub", "is a directory"]


@hostile
def report_onto_a_symlink_loop(d):
    a = _st(d, "a.safetensors")
    (d / "loop.md").symlink_to(d / "loop.md")
    return [a, a, "--markdown", d / "loop.md"], ["loop.md", "symbolic link loop"]


@hostile
def inspect_json_onto_a_symlink(d):
    a = _st(d, "a.safetensors")
    (d / "out.json").symlink_to(d / "gone.json")  # dangling: a write would create a file elsewhere
    return ["inspect", a, "--json", d / "out.json"], ["out.json", "symbolic link"]


# -- 4. config values: typed, range-checked, and checked against the tensors before any work
def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))  # NaN/Infinity written as JSON's common extension, as Python reads it


HF_CONFIG_BREAKS = {  # key: value -> words the error must hold (besides config.json and the key)
    "rms_norm_eps_string": ("rms_norm_eps", "abc", "positive finite number"),
    "rms_norm_eps_nan": ("rms_norm_eps", float("nan"), "NaN is not JSON"),  # refused as JSON already
    "rms_norm_eps_inf": ("rms_norm_eps", float("inf"), "Infinity is not JSON"),
    "rms_norm_eps_zero": ("rms_norm_eps", 0, "positive finite number"),
    "heads_string": ("num_attention_heads", "8", "positive integer"),
    "heads_bool": ("num_attention_heads", True, "positive integer"),
    "heads_float": ("num_attention_heads", 8.0, "positive integer"),
    "kv_heads_do_not_divide": ("num_key_value_heads", 3, "not a multiple"),
    "kv_heads_zero": ("num_key_value_heads", 0, "positive integer"),
    "hidden_negative": ("hidden_size", -64, "positive integer"),
    "hidden_mismatch": ("hidden_size", 128, "columns of model.embed_tokens.weight"),
    "layers_zero": ("num_hidden_layers", 0, "positive integer"),
    "layers_mismatch": ("num_hidden_layers", 5, "tensors hold 2"),
    "layers_absurd": ("num_hidden_layers", 10 ** 30, "at most"),
    "vocab_absurd": ("vocab_size", 10 ** 12, "at most"),
    "vocab_beyond_embedding": ("vocab_size", 1000, "exceeds the 100 rows"),
    "ffn_mismatch": ("intermediate_size", 97, "FFN weights have 96 rows"),
    "head_dim_odd": ("head_dim", 7, "positive even number"),
    "head_dim_mismatch": ("head_dim", 16, "heads x head_dim"),
    "rope_theta_negative": ("rope_theta", -1, "positive finite number"),
    "rope_theta_string": ("rope_theta", "1e4", "positive finite number"),
    "rope_scaling_string": ("rope_scaling", "linear", "an object"),
    "rope_scaling_bad_factor": ("rope_scaling", {"rope_type": "linear", "factor": "x"}, "'factor'"),
    "sliding_window_negative": ("sliding_window", -5, "integer"),
    "tie_flag_string": ("tie_word_embeddings", "false", "true or false"),
    "dtype_unknown": ("torch_dtype", "float33", "dtype name"),
    "dtype_list": ("torch_dtype", ["float32"], "dtype name"),
    "eos_negative": ("eos_token_id", -2, "token id"),
    "max_positions_float": ("max_position_embeddings", 2.5, "positive integer"),
}


def _hf_config_case(name, key, value, want):
    def build(d):
        src = emit(d / "hf", "llama-gqa", "hf")
        _edit_json(src / "config.json", **{key: value})
        return _convert_argv(src, d / "out"), ["config.json", want] + ([] if "JSON" in want else [f"'{key}'"])
    build.__name__ = f"config_{name}"
    return build


for _n, (_k, _v, _w) in HF_CONFIG_BREAKS.items():
    hostile(_hf_config_case(_n, _k, _v, _w))


@hostile
def config_is_a_list(d):
    src = emit(d / "hf", "llama-gqa", "hf")
    (src / "config.json").write_text("[1, 2]")
    return _convert_argv(src, d / "out"), ["config.json", "JSON object"]


META_PARAMS_BREAKS = {
    "n_heads_string": ("n_heads", "8", "positive integer"),
    "norm_eps_zero": ("norm_eps", 0.0, "positive finite number"),
    "dim_mismatch": ("dim", 48, "columns of tok_embeddings.weight"),
    "n_kv_heads_bool": ("n_kv_heads", True, "positive integer"),
    "n_layers_negative": ("n_layers", -2, "positive integer"),
    "vocab_zero": ("vocab_size", 0, "positive integer"),
}


def _meta_case(name, key, value, want):
    def build(d):
        src = emit(d / "meta", "llama-gqa", "meta")
        _edit_json(src / "params.json", **{key: value})
        return _convert_argv(src, d / "out"), ["params.json", f"'{key}'", want]
    build.__name__ = f"params_{name}"
    return build


for _n, (_k, _v, _w) in META_PARAMS_BREAKS.items():
    hostile(_meta_case(_n, _k, _v, _w))

MEGATRON_ARGS_BREAKS = {
    "hidden_string": ("hidden_size", "64", "positive integer"),
    "eps_nan": ("layernorm_epsilon", float("nan"), "positive finite number"),
    "kv_heads_do_not_divide": ("num_attention_heads_kv", 3, "not a multiple"),
    "ffn_mismatch": ("ffn_hidden_size", 95, "dense_h_to_4h"),
    "tie_flag_string": ("tie_embed_logits", "yes", "true or false"),
    "kv_channels_zero": ("kv_channels", 0, "positive integer"),
    "true_vocab_beyond_embedding": ("true_vocab_size", 500, "exceeds the 100 rows"),
}


def _megatron_case(name, key, value, want):
    def build(d):
        meg = emit(d / "meg", "llama-gqa", "megatron")
        f = meg / "release/mp_rank_00/model_optim_rng.pt"
        obj = torch.load(f, weights_only=False)
        setattr(obj["args"], key, value)
        torch.save(obj, f)
        return (["convert", "megatron-to-hf", "--input_dir", meg, "--output_dir", d / "out"],
                ["model_optim_rng.pt", f"args key '{key}'", want])
    build.__name__ = f"megatron_args_{name}"
    return build


for _n, (_k, _v, _w) in MEGATRON_ARGS_BREAKS.items():
    hostile(_megatron_case(_n, _k, _v, _w))


@hostile
def logits_with_a_string_eps(d):
    a, b = emit(d / "a", "llama-gqa", "hf"), emit(d / "b", "llama-gqa", "hf")
    _edit_json(b / "config.json", rms_norm_eps="abc")
    return ["logits", a, b], ["b/config.json", "'rms_norm_eps'", "'abc'"]


@hostile
def cross_layout_compare_with_a_bad_config(d):
    a, b = emit(d / "a", "llama-gqa", "hf"), emit(d / "b", "llama-gqa", "meta")
    _edit_json(b / "params.json", dim=48)
    return [a, b], ["params.json", "'dim'", "columns"]


def _snapshot(root):
    """Every entry under root: regular files by sha256, links by target, others by type (never opened)."""
    import hashlib
    import stat as st_
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            m = os.lstat(p).st_mode
            if st_.S_ISLNK(m):
                out[p] = ("link", os.readlink(p))
            elif st_.S_ISREG(m):
                with open(p, "rb") as f:
                    out[p] = ("file", hashlib.sha256(f.read()).hexdigest())
            else:
                out[p] = ("dir" if st_.S_ISDIR(m) else "special", None)
    return out


class _Hang(Exception):
    pass


def _run_hostile(run_cli, d, argv, words):
    """None if the input ended cleanly, else why not."""
    before = _snapshot(d)

    def alarm(*_):
        raise _Hang()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    try:
        code, out, err = run_cli(*argv)
    except _Hang:
        return "hung"
    except BaseException as e:  # noqa: BLE001 - an exception out of main() is a failure to count, not to stop on
        return f"main() raised {e.__class__.__name__}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    lines = err.strip().splitlines()
    if code != 2:
        return f"exit {code}: {err.strip()[:300]}"
    if len(lines) != 1 or not lines[0].startswith("ckdiff: error:") or "Traceback" in err:
        return f"not one error line: {err[:300]!r}"
    if "internal error" in lines[0]:
        return f"internal error: {lines[0]}"
    if any(c in lines[0] for c in "\x1b\r\x07"):
        return f"control character in {lines[0]!r}"
    missing = [w for w in words if w not in lines[0]]
    if missing:
        return f"line lacks {missing}: {lines[0]}"
    if "s3cr3t" in err or "s3cr3t" in out:
        return "printed file contents"
    if _snapshot(d) != before:
        return "files changed or written"
    return None


def test_hostile_suite(tmp_path, run_cli, capsys):
    """Every hostile input: exit 2, one line naming the file and the problem, no traceback,
    nothing written, inputs (and links' targets) unchanged, no hang."""
    failures, tried = {}, 0
    for name, build in [*((f"case_{n}", f) for n, f in CASES.items()), *HOSTILE.items()]:
        d = tmp_path / name
        d.mkdir()
        got = build(d)
        argv, words = (got if isinstance(got[0], list) else (["inspect", got[0]], got[1]))
        tried += 1
        why = _run_hostile(run_cli, d, [str(a) for a in argv], words)
        if why:
            failures[name] = why
    assert not (tmp_path / "CANARY").exists()
    with capsys.disabled():
        print(f"\nhostile inputs: {tried} tried, {tried - len(failures)} ended cleanly "
              "(exit 2, one line naming file and problem, nothing written, inputs unchanged)")
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())


# -------------------------------------------------------------- 6. the reference reader as the oracle
_ORACLE_DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64"]
_INT = st.one_of(st.integers(0, 4), st.sampled_from([-1, 1 << 63, 1 << 64, 1 << 40]))
_BAD = st.sampled_from(["2", 2.0, True, None, [], {}, -1])


def _rarely(draw, valid, defect, one_in=8):
    """``valid``, or a drawn defect about once in ``one_in`` draws."""
    return draw(defect) if draw(st.integers(0, one_in - 1)) == 0 else valid


_ITEM = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1, "F64": 8}


@st.composite
def _headers(draw):
    """A valid header with, now and then, a defect drawn into a field; plus the data length and padding."""
    n = draw(st.integers(0, 3))
    header, offset = {}, 0
    for i in range(n):
        dtype = draw(st.sampled_from(_ORACLE_DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        lo, hi = offset, offset + math.prod(shape) * _ITEM[dtype]
        offset = hi
        dtype = _rarely(draw, dtype, st.sampled_from(["f32", "Q7", ["F32"], 5, None]), 12)
        shape = _rarely(draw, shape, st.one_of(
            st.lists(st.one_of(_INT, _BAD), min_size=1, max_size=3), st.sampled_from(["4", None, {}]),
            st.just([1 << 40, 1 << 40, 0]), st.just([0, 1 << 63]), st.just([0, 1 << 62, 1 << 62])), 12)
        offsets = _rarely(draw, [lo, hi], st.one_of(
            st.sampled_from([[lo, hi + 4], [hi, lo], [lo + 4, hi + 4], [lo], [lo, hi, hi], [float(lo), hi],
                             [lo, True], [-1, hi], [lo, 1 << 64], "0-4"])), 12)
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        shape_ = draw(st.integers(0, 15))
        if shape_ == 0:
            entry = [dtype, shape, offsets]  # the reference reader also takes the fields as a list
        elif shape_ == 1:
            entry = draw(st.sampled_from([[dtype, shape], [dtype, shape, offsets, 1], 7, "x", None]))
        elif shape_ == 2:
            entry["extra"] = draw(st.one_of(_BAD, st.just("F32"), st.just([[[]]])))
        elif shape_ == 3:
            del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
        name = _rarely(draw, f"t{i}", st.sampled_from(["t0", "", "a\x1b", "__metadata__"]), 10)
        header[name] = entry
    if draw(st.booleans()):
        header["__metadata__"] = _rarely(draw, {"format": "pt"}, st.one_of(
            st.just(None), st.just({}), st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), _BAD),
                                                          max_size=2), _BAD), 3)
    extra = _rarely(draw, 0, st.sampled_from([4, -4, 1]), 10)
    pad = _rarely(draw, b"", st.sampled_from([b"  ", b"\n\t", b"\0", b"\x0c", b" x"]), 6)
    return header, max(0, offset + extra), pad


def _reference_accepts(p) -> bool:
    from safetensors.torch import load_file
    try:
        load_file(p)
        return True
    except Exception:  # noqa: BLE001 - any refusal by the reference reader
        return False


@_fuzz_settings()
@given(h=_headers())
def test_header_schema_matches_the_reference_reader(tmp_path_factory, h):
    """For generated headers, ckdiff's reader accepts exactly when the safetensors library does."""
    from ckdiff.io.safetensors import SafetensorsFile
    header, data_len, pad = h
    p = tmp_path_factory.mktemp("oracle") / "h.safetensors"
    raw = json.dumps(header).encode() + pad
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\1" * data_len)
    try:
        SafetensorsFile(p)
        ours = True
    except CkdiffError:
        ours = False
    if _beyond_torch(header):  # the one documented difference: empty tensors torch cannot lay out
        assert not ours
    else:
        assert ours == _reference_accepts(p), (header, data_len, pad)


def _beyond_torch(header) -> bool:
    for e in header.values():
        shape = e.get("shape") if isinstance(e, dict) else e[1] if isinstance(e, list) and len(e) == 3 else None
        if isinstance(shape, list) and all(type(d) is int and 0 <= d < 1 << 64 for d in shape) and 0 in shape \
                and math.prod(d or 1 for d in shape) > 1 << 62:
            return True
    return False


def test_header_schema_fixed_examples_match_the_reference_reader(tmp_path):
    """The schema breaks of the hostile suite, and their valid twins, against the reference reader."""
    from ckdiff.io.safetensors import SafetensorsFile
    headers = [*(json.dumps(h).encode() for h in SCHEMA_BREAKS.values()), *RAW_BREAKS.values()]
    valid = [json.dumps({"a": _entry()}).encode(), json.dumps({"__metadata__": None, "a": _entry()}).encode(),
             json.dumps({"a": _entry(extra={"x": [1]})}).encode(), b'{"a":["F32",[2,2],[0,16]]}',
             json.dumps({"z": _entry((0, 1 << 30, 1 << 30), (0, 0)), "a": _entry()}).encode(),
             b' {"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}\t\n']
    seen = []
    for raw in headers + valid:
        p = _header_file(tmp_path, None, b"\0" * 16, raw=raw)
        try:
            SafetensorsFile(p)
            ours = True
        except CkdiffError:
            ours = False
        seen.append(ours)
        assert ours == _reference_accepts(p), raw
    assert seen == [False] * len(headers) + [True] * len(valid)


# -------------------------------------------------------------- 3. layouts that are not bombs still load
def test_views_transposes_and_tied_storages_are_accepted(tmp_path):
    big = torch.randn(8, 16)
    tied = torch.randn(5, 4)
    torch.save({"t": big.t(), "slice": big[2:4], "col": big[:, 3], "tied_a": tied, "tied_b": tied,
                "scalar": torch.tensor(2.5), "empty": torch.randn(0, 3).expand(0, 3)}, tmp_path / "v.pt")
    ck = open_checkpoint(str(tmp_path / "v.pt"))
    assert torch.equal(ck.tensors["t"].load(), big.t()) and torch.equal(ck.tensors["col"].load(), big[:, 3])
    assert ck.tensors["tied_b"].shape == (5, 4)


# -------------------------------------------------------------- 7. names reach the terminal escaped
def test_control_characters_in_names_are_escaped_on_the_terminal(tmp_path, run_cli):
    from safetensors.torch import save_file
    evil = "w\x1b]0;pwned\x07\x1b[2J\u202e"
    save_file({evil: torch.randn(3), "ok": torch.randn(2)}, tmp_path / "a.safetensors")
    save_file({evil: torch.randn(3), "ok": torch.randn(2)}, tmp_path / "b.safetensors")
    code, out, err = run_cli("inspect", tmp_path / "a.safetensors")
    assert code == 0 and "\\x1b]0;pwned\\x07\\x1b[2J\\u202e" in out
    code, out2, _ = run_cli(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert code == 1 and "\\x1b[2J" in out2
    for text in (out, out2):
        assert not any(c in text for c in "\x1b\x07\u202e"), text


def test_printable_is_idempotent_and_leaves_plain_text_alone():
    from ckdiff.text import printable
    assert printable("layers.0.weight é 中") == "layers.0.weight é 中"
    once = printable("a\nb\x1b\x9b\u2066c")
    assert once == "a\\nb\\x1b\\x9b\\u2066c" and printable(once) == once


# -------------------------------------------------------------- 8. concurrency and faults
def _convert_argv(src, out, *extra):
    return ["convert", "to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir", str(src),
            "--output_checkpoint_dir", str(out), *extra]


@pytest.mark.parametrize("renameat2", [True, False])
def test_output_that_appears_meanwhile_is_never_replaced(tmp_path, run_cli, monkeypatch, renameat2):
    from ckdiff.io import writers
    if not renameat2:  # the fallback for systems without renameat2
        def nosys(*a):
            raise OSError(errno.ENOSYS, "renameat2 not available")
        monkeypatch.setattr(writers, "_renameat2", nosys)
    src = emit(tmp_path / "hf", "llama-gqa", "hf")
    out = tmp_path / "out"
    real = writers.write_meta_like

    def racing(*a, **k):  # another convert finishes into the same output while this one writes
        real(*a, **k)
        out.mkdir()
        (out / "params.json").write_text('{"other": 1}')
    monkeypatch.setattr("ckdiff.convert.api.write_meta_like", racing)
    _expect_2(run_cli, *_convert_argv(src, out), words=["out", "appeared", "nothing was replaced"])
    assert sorted(os.listdir(out)) == ["params.json"] and (out / "params.json").read_text() == '{"other": 1}'
    assert not list(tmp_path.glob(".out.ckdiff-tmp-*"))


@pytest.mark.parametrize("renameat2", [True, False])
def test_overwrite_replaces_in_one_step(tmp_path, run_cli, monkeypatch, renameat2):
    from ckdiff.io import writers
    calls = []
    real = writers._renameat2

    def spy(src, dst, flags):
        calls.append(flags)
        if not renameat2:
            raise OSError(errno.EINVAL, "not supported here")
        return real(src, dst, flags)
    monkeypatch.setattr(writers, "_renameat2", spy)
    src = emit(tmp_path / "hf", "llama-gqa", "hf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert run_cli(*_convert_argv(src, out, "--overwrite"))[0] == 0
    assert not (out / "stale.txt").exists() and (out / "params.json").is_file()
    assert writers.RENAME_EXCHANGE in calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no temp or old directory left


def test_atomic_file_without_overwrite_never_replaces(tmp_path):
    from ckdiff.io.writers import atomic_file
    target = tmp_path / "r.json"
    target.write_text("theirs")
    with pytest.raises(CkdiffError, match="exists"):
        atomic_file(target, lambda tmp: open(tmp, "w").write("ours"), overwrite=False)
    assert target.read_text() == "theirs" and os.listdir(tmp_path) == ["r.json"]


class _FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        self.room -= len(b)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(b)

    def __getattr__(self, k):
        return getattr(self.f, k)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


@pytest.mark.parametrize("target", ["megatron", "pth"])
def test_full_disk_during_torch_save(tmp_path, run_cli, monkeypatch, target):
    from ckdiff.io import torch_zip, writers
    src = emit(tmp_path / "hf", "llama-gqa", "hf")
    for mod in (writers, torch_zip):  # the streamed torch-zip writer opens its own files
        monkeypatch.setattr(mod, "open", lambda p, m="r", *a, **k: _FullDisk(open(p, m, *a, **k), 3000),
                            raising=False)
    out = tmp_path / "out"
    if target == "megatron":
        argv = ["convert", "hf-to-megatron", "llama2", "--model-path", src, "--out", out, "--tp", "2"]
    else:
        argv = _convert_argv(src, out, "--output_safetensors=False")
    _expect_2(run_cli, *argv, words=["out", "no space left on device"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_report_into_read_only_directory(tmp_path, run_cli, monkeypatch):
    a = _st(tmp_path, "a.safetensors")

    def denied(*a, **k):  # as root a chmod would not stop the write, so the refusal is simulated
        raise PermissionError(errno.EROFS, "Read-only file system")
    (tmp_path / "ro").mkdir()  # a missing directory is its own error (see report_into_a_missing_directory)
    monkeypatch.setattr("tempfile.mkstemp", denied)
    for flag in ("--html", "--json", "--markdown"):
        _expect_2(run_cli, a, a, flag, tmp_path / "ro" / "r.out", words=["r.out", "Read-only file system"])


SIGINT_SCRIPT = r"""
import os, signal, sys
from ckdiff.io import torch_zip
count = [0]
real = torch_zip.write_torch_zip
def save(*a, **k):  # Ctrl-C while the second rank file is being written
    count[0] += 1
    if count[0] == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return real(*a, **k)
torch_zip.write_torch_zip = save
from ckdiff.formats import megatron_llm as megatron
megatron.write_torch_zip = save
from ckdiff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_exits_130_and_leaves_no_temp_directory(tmp_path):
    src = emit(tmp_path / "hf", "llama-gqa", "hf")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", SIGINT_SCRIPT, "convert", "hf-to-megatron", "llama2", "--model-path",
                        str(src), "--out", str(out), "--tp", "2", "--pp", "2"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip() == "ckdiff: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# -------------------------------------------------------------- 9. metadata at scale
def test_inspect_of_a_200k_entry_header_is_linear(tmp_path, run_cli):
    n = 200_000
    parts = [f'"t{i}.w":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(n)]
    raw = ("{" + ",".join(parts) + "}").encode()
    p = tmp_path / "many.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * (n // 256) + bytes(n % 256))
    code, out, _ = run_cli("inspect", p)
    lines = out.splitlines()
    assert code == 0 and f"{n} tensors" in lines[0] and lines[-1].split()[0] == f"t{n - 1}.w"
    assert len(lines) == n + 2  # summary, column header, one line a tensor


def test_empty_tensors_with_huge_dimensions_compare_without_overflow(tmp_path, run_cli):
    """Within the layout limit, empty tensors with enormous dimensions go through compare and diagnosis."""
    a = _header_file(tmp_path, {"z": _entry((0, 1 << 31, 1 << 31), (0, 0)), "y": _entry((1 << 61, 0), (0, 0)),
                                "w": _entry((4,), (0, 16))}, torch.randn(4).numpy().tobytes(), name="a.safetensors")
    b = _header_file(tmp_path, {"z": _entry((0, 1 << 61), (0, 0)), "y": _entry((1 << 61, 0), (0, 0)),
                                "w": _entry((4,), (0, 16))}, torch.randn(4).numpy().tobytes(), name="b.safetensors")
    for extra in ([], ["--format", "file"]):  # the torch-free lane (compare/lane.py), then the full comparison
        code, out, err = run_cli(a, b, "--json", tmp_path / "r.json", *extra)
        assert code == 1 and not err, err
        rows = {t["name"]: t["status"] for t in json.loads((tmp_path / "r.json").read_text())["result"]["tensors"]}
        assert rows == {"z": "shape", "y": "equal", "w": "differ"}


# -------------------------------------------------------------- 1. reports to streams and through links
def _drain(fifo, sink):
    import threading

    def read():
        with open(fifo, "rb") as f:
            sink.append(f.read())
    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("via_link", [False, True])
def test_report_to_a_fifo_is_a_stream_never_replaced(tmp_path, run_cli, via_link):
    """Like `--markdown /dev/stdout` (a link to a pipe): the FIFO (and the link) stay as they are."""
    a = _st(tmp_path, "a.safetensors")
    os.mkfifo(tmp_path / "pipe")
    target = tmp_path / "pipe"
    if via_link:
        (tmp_path / "stdout").symlink_to(tmp_path / "pipe")
        target = tmp_path / "stdout"
    got = []
    t = _drain(tmp_path / "pipe", got)
    code, out, err = run_cli(a, a, "-q", "--markdown", target)
    t.join(10)
    assert code == 0, err
    assert got and b"ckdiff compare" in got[0] and b"equivalent" in got[0]
    import stat as st_
    assert st_.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)
    if via_link:
        assert os.readlink(tmp_path / "stdout") == str(tmp_path / "pipe")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.safetensors", "pipe"] + (["stdout"] if via_link else []))


def test_force_writes_through_a_link_and_keeps_it(tmp_path, run_cli):
    a = _st(tmp_path, "a.safetensors")
    (tmp_path / "reports").mkdir()
    (tmp_path / "r.json").symlink_to(tmp_path / "reports" / "r.json")
    code, _, err = run_cli(a, a, "-q", "--json", tmp_path / "r.json", "--force")
    assert code == 0, err
    assert os.path.islink(tmp_path / "r.json")
    assert json.loads((tmp_path / "reports" / "r.json").read_text())["verdict"] == "equivalent"


# -------------------------------------------------------------- 4. config values
def test_odd_config_of_a_same_layout_pair_is_a_finding_not_a_crash(tmp_path, run_cli):
    """Same-layout tensors need no config: the pair is compared, the bad value is a finding (DIFFER)."""
    a, b = emit(tmp_path / "a", "llama-gqa", "hf"), emit(tmp_path / "b", "llama-gqa", "hf")
    _edit_json(b / "config.json", rms_norm_eps="abc")
    code, out, err = run_cli(a, b, "--json", "-")
    assert code == 1, err
    doc = json.loads(out)
    assert doc["verdict"] == "differ"
    res = doc.get("result", doc)
    assert all(t["status"] == "equal" for t in res["tensors"]), res["tensors"][:2]
    assert any("config.json" in f and "'rms_norm_eps'" in f and "'abc'" in f for f in res["config_findings"])


def test_typed_fields_refuse_bools_strings_and_non_finite_values():
    from ckdiff.models.config import ConfigError, parse_config
    ok = parse_config("hf", {"num_attention_heads": 8, "rms_norm_eps": 1, "tie_word_embeddings": None}, "c.json")
    assert ok == {"num_attention_heads": 8, "rms_norm_eps": 1.0} and isinstance(ok["rms_norm_eps"], float)
    for key, v in [("num_attention_heads", True), ("num_attention_heads", "8"), ("hidden_size", 0),
                   ("rms_norm_eps", float("nan")), ("rms_norm_eps", float("-inf")), ("rope_theta", False),
                   ("vocab_size", 1 << 40), ("tie_word_embeddings", 1)]:
        with pytest.raises(ConfigError, match=f"c.json: key '{key}': expected"):
            parse_config("hf", {key: v}, "c.json")
    assert parse_config("meta", {"vocab_size": -1}, "p.json") == {}  # Meta's "unset"
    with pytest.raises(ConfigError, match="args key 'num_layers'"):
        parse_config("megatron", {"num_layers": 2.0}, "rank.pt")


def test_real_world_config_spellings_stay_valid():
    from ckdiff.models.config import parse_config
    llama3 = {"rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"},
              "eos_token_id": [128001, 128008, 128009], "rope_theta": 500000.0, "torch_dtype": "bfloat16",
              "sliding_window": None, "max_position_embeddings": 131072}
    assert parse_config("hf", llama3, "c.json")["eos_token_id"] == [128001, 128008, 128009]
    assert "pad_token_id" not in parse_config("hf", {"pad_token_id": -1, "bos_token_id": 0}, "c.json")
    assert parse_config("meta", {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                                 "vocab_size": -1, "ffn_dim_multiplier": 1.3, "use_scaled_rope": True}, "p.json")
    assert parse_config("megatron", {"params_dtype": torch.bfloat16, "glu_activation": None,
                                     "num_attention_heads_kv": None}, "r.pt") == {"params_dtype": "bfloat16"}


def test_report_to_a_link_to_standard_outputs_own_file_goes_to_stdout(tmp_path):
    """`ckdiff A B --markdown /dev/stdout > out.txt`, with a link of our own standing in for /dev/stdout:
    the report joins standard output (terminal lines go to stderr), the link is never replaced."""
    a = _st(tmp_path, "a.safetensors")
    (tmp_path / "stdout").symlink_to(tmp_path / "out.txt")
    with open(tmp_path / "out.txt", "wb") as out:
        p = subprocess.run([sys.executable, "-m", "ckdiff", str(a), str(a), "--markdown", str(tmp_path / "stdout")],
                           stdout=out, stderr=subprocess.PIPE, timeout=120,
                           env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert p.returncode == 0, p.stderr
    assert os.readlink(tmp_path / "stdout") == str(tmp_path / "out.txt")
    text = (tmp_path / "out.txt").read_text()
    assert text.startswith("## ") and "ckdiff compare" in text and "EQUIVALENT" not in text
    assert b"EQUIVALENT" in p.stderr
