"""Pickles that would run code, one per entry point and per pickle of the file: every one is refused
with one line naming the file, and the canary the payload would create never appears.

Fixtures: checkpoints from ckdiff's golden writers and torch.save / torch.distributed.checkpoint.save
(the libraries that write these formats); payloads are spliced into the pickle the format carries.
"""
import dataclasses
import io
import os
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from ckdiff.formats.readers import open_checkpoint
from ckdiff.errors import InputError
from ckdiff.golden.emit import emit
from helpers import dcp_save

CANARY = "CANARY"


class Payload:
    """Unpickling an instance runs ``touch <dir>/CANARY``: proof that code ran."""

    def __init__(self, d):
        self.d = d

    def __reduce__(self):
        return (os.system, (f"touch {self.d}/{CANARY}",))


def _pickle_ends(data: bytes, n: int) -> list:
    """End offsets of the first ``n`` pickles that follow each other in ``data`` (a legacy torch file)."""
    ends, pos = [], 0
    for _ in range(n):
        for op, _arg, at in pickletools.genops(io.BytesIO(data[pos:])):
            if op.name == "STOP":
                pos += at + 1
                break
        ends.append(pos)
    return ends


LEGACY_PICKLES = ("magic number", "protocol", "sys_info", "object", "storage keys")


def _legacy_with_payload(obj, which: int, d: Path) -> bytes:
    """torch's legacy (non-zip) serialization of ``obj`` with its pickle number ``which`` replaced."""
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    ends = _pickle_ends(data, 5)
    start = ends[which - 1] if which else 0
    return data[:start] + pickle.dumps(Payload(d), protocol=2) + data[ends[which]:]


def _zip_with_payload(obj: dict, d: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({**obj, "extra": Payload(d)}, buf)
    return buf.getvalue()


VARIANTS = ["zip data.pkl"] + [f"legacy {p} pickle" for p in LEGACY_PICKLES]


def _payload_file(obj, variant: str, d: Path) -> bytes:
    if variant == "zip data.pkl":
        return _zip_with_payload(obj, d)
    return _legacy_with_payload(obj, LEGACY_PICKLES.index(variant.split(" ", 1)[1][: -len(" pickle")]), d)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    base = tmp_path_factory.mktemp("seeds")
    return {"meta": emit(base / "meta", "llama-gqa", "meta"),
            "megatron": emit(base / "megatron", "llama-gqa", "megatron"),
            "mcore": emit(base / "mcore", "llama-gqa", "mcore")}


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _trusted_load(p: Path):
    return torch.load(p, map_location="cpu", weights_only=False)  # our own fixture: trusted here


def _bin(d, variant):
    p = d / "pytorch_model.bin"
    g = torch.Generator().manual_seed(0)
    p.write_bytes(_payload_file({"w": torch.randn(4, 3, generator=g)}, variant, d))
    return p, p


def _meta(d, variant, seeds):
    root = _copy(seeds["meta"], d / "meta")
    shard = root / "consolidated.00.pth"
    shard.write_bytes(_payload_file(_trusted_load(shard), variant, d))
    return root, shard


def _megatron(d, variant, seeds):
    root = _copy(seeds["megatron"], d / "meg")
    rank = next(root.rglob("model_optim_rng.pt"))
    rank.write_bytes(_payload_file(_trusted_load(rank), variant, d))
    return root, rank


def _mcore_common_pt(d, variant, seeds):
    root = _copy(seeds["mcore"], d / "mc")
    it = next(root.glob("iter_*"))
    state = {"args": {"num_layers": 2}, "checkpoint_version": 3.0}
    (it / "common.pt").write_bytes(_payload_file(state, variant, d))
    _drop_common_item(it)
    return root, it / "common.pt"


def _drop_common_item(it: Path):
    """The iteration's DCP metadata without its common_state item, so that common.pt is read."""
    from ckdiff.formats.mcore import COMMON_KEY
    md = pickle.loads((it / ".metadata").read_bytes())  # our own fixture: trusted here
    md.state_dict_metadata.pop(COMMON_KEY)
    md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != COMMON_KEY}
    (it / ".metadata").write_bytes(pickle.dumps(md))


ENTRY_POINTS = {"bin": lambda d, v, s: _bin(d, v), "meta": _meta, "megatron": _megatron, "mcore common.pt": _mcore_common_pt}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_payload_in_every_pickle_of_every_torch_file_is_refused(tmp_path, run_cli, seeds, entry, variant):
    arg, named = ENTRY_POINTS[entry](tmp_path, variant, seeds)
    code, out, err = run_cli("inspect", arg)
    assert not (tmp_path / CANARY).exists(), f"{entry}, {variant}: the payload ran"
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ckdiff: error:"), (code, err)
    assert named.name in lines[0] and "posix.system is not allowed" in lines[0], lines[0]


# ------------------------------------------------------------------ DCP: .metadata, chunks, byte items
def _dcp(d: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    dcp_save({"a": torch.randn(6, 4, generator=g), "b": torch.randn(5, generator=g)}, d)
    return d


def _metadata(root: Path):
    return pickle.loads((root / ".metadata").read_bytes())  # our own fixture: trusted here


def test_payload_in_dcp_metadata_is_refused(tmp_path, run_cli):
    root = _dcp(tmp_path / "ck")
    md = _metadata(root)
    md.storage_meta = Payload(tmp_path)
    (root / ".metadata").write_bytes(pickle.dumps(md))
    code, _, err = run_cli("inspect", root)
    assert not (tmp_path / CANARY).exists()
    assert code == 2 and ".metadata" in err and "posix.system is not allowed" in err, err


def test_payload_in_a_dcp_chunk_is_refused(tmp_path, run_cli):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    root = _dcp(tmp_path / "ck")
    md = _metadata(root)
    idx = next(k for k in md.storage_data if k.fqn == "a")
    blob = _zip_with_payload({"t": torch.zeros(6, 4)}, tmp_path)
    (root / "evil.distcp").write_bytes(blob)
    md.storage_data[idx] = _StorageInfo("evil.distcp", 0, len(blob))
    (root / ".metadata").write_bytes(pickle.dumps(md))
    code, _, err = run_cli(root, _dcp(tmp_path / "good"))  # chunks are read when their rows are
    assert not (tmp_path / CANARY).exists()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "evil.distcp" in err and "posix.system is not allowed" in err, err


@pytest.mark.parametrize("where", ["dcp byte item", "common.pt"])
def test_payload_in_the_mcore_common_state_is_refused(tmp_path, run_cli, monkeypatch, where):
    from ckdiff.formats import mcore
    from ckdiff.golden.models import hf_state, tiny_config
    cfg = tiny_config("llama-gqa")
    monkeypatch.setattr(mcore, "to_args", lambda cfg, vp: Payload(tmp_path))
    root = mcore.write_mcore(tmp_path / "mc", hf_state(cfg), cfg, common="dcp" if where.startswith("dcp") else "common.pt")
    code, _, err = run_cli("inspect", root)
    assert not (tmp_path / CANARY).exists()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("__0_0.distcp" if where.startswith("dcp") else "common.pt") in err and "posix.system" in err, err


# ------------------------------------------------------------------ planner dataclasses (megatron-core's all_local_plans)
def _plans(state):
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.filesystem import _StoragePrefix
    planner = DefaultSavePlanner()
    planner.set_up_planner(state, None, True)
    return [dataclasses.replace(planner.create_local_plan(), storage_data=_StoragePrefix("__0_"))]


def test_dcp_metadata_with_save_plans_is_read(tmp_path):
    """megatron-core's dist_checkpointing.save keeps every rank's SavePlan on Metadata.all_local_plans:
    torch's planner dataclasses are read as data."""
    g = torch.Generator().manual_seed(2)
    state = {"a": torch.randn(6, 4, generator=g), "b": torch.randn(5, generator=g)}
    root = tmp_path / "ck"
    dcp_save(state, root)
    md = _metadata(root)
    md.all_local_plans = _plans(state)
    (root / ".metadata").write_bytes(pickle.dumps(md))
    ck = open_checkpoint(str(root))
    assert torch.equal(ck["a"].load(), state["a"]) and torch.equal(ck["b"].load(), state["b"])


@pytest.mark.parametrize("bad", ["payload", "field type", "unknown field"])
def test_save_plans_carrying_anything_else_are_refused(tmp_path, bad):
    g = torch.Generator().manual_seed(3)
    state = {"a": torch.randn(6, 4, generator=g)}
    root = tmp_path / "ck"
    dcp_save(state, root)
    md = _metadata(root)
    plan = _plans(state)[0]
    if bad == "payload":
        plan = dataclasses.replace(plan, planner_data=Payload(tmp_path))
    elif bad == "field type":
        plan = dataclasses.replace(plan, usable="yes")
    else:
        object.__setattr__(plan, "hook", "x")  # a frozen dataclass: what a hand-made pickle can carry
    md.all_local_plans = [plan]
    (root / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(InputError, match=r"\.metadata: refused to unpickle the DCP metadata"):
        open_checkpoint(str(root))
    assert not (tmp_path / CANARY).exists()


# ------------------------------------------------------------------ the restricted reader reads what torch wrote
@pytest.mark.parametrize("legacy", [False, True])
def test_restricted_reader_reads_torch_files_like_torch(tmp_path, legacy):
    """Zip and legacy files alike: values, dtypes, views and shared storages as torch.load reads them."""
    from ckdiff.io.unpickle import load_torch
    g = torch.Generator().manual_seed(4)
    a = torch.randn(5, 6, generator=g)
    obj = {"a": a, "t": a.t(), "row": a[2], "half": torch.randn(7, generator=g).half(),
           "bf16": torch.randn(3, 2, generator=g).bfloat16(),
           "i64": torch.randint(0, 9, (4,), generator=g), "p": torch.nn.Parameter(torch.randn(2, generator=g)),
           "meta": {"n": 3, "s": "x", "b": b"\x00\x01", "l": [1.5, None]}}
    if not legacy:  # torch 2.13 cannot read back a float8 storage it wrote in the legacy format
        obj["f8"] = torch.randn(4, generator=g).to(torch.float8_e4m3fn)
    p = tmp_path / "f.pt"
    torch.save(obj, p, _use_new_zipfile_serialization=not legacy)
    assert zipfile.is_zipfile(p) != legacy
    ref = torch.load(p, weights_only=True)
    got = load_torch(p)
    for k, v in ref.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k].float(), v.float()), k
        else:
            assert got[k] == v, k
    assert got["row"].untyped_storage().data_ptr() == got["a"].untyped_storage().data_ptr()
    assert torch.equal(got["t"], got["a"].t())


def test_trust_pickle_still_runs_the_file(tmp_path):
    """--trust-pickle is the one door to torch.load(weights_only=False): it runs the payload, by design."""
    p, _ = _bin(tmp_path, "zip data.pkl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        open_checkpoint(str(p), trust_pickle=True)
    assert (tmp_path / CANARY).exists()
