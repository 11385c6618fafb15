"""Memory and time bombs: small files that ask for gigabytes, nest without end or claim terabytes.
Each runs in a subprocess under an address-space cap and must end with one line naming the file,
exit 2, a small peak RSS and within a time bound. Files are built by hand (pickle opcodes, zipfile,
sparse files): no library writes such files."""
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CAP = 12 << 30  # address space; a runaway allocation fails fast instead of swapping the machine
PEAK_RSS = 1 << 30  # bytes: what a refusal may cost at most (torch's import alone is ~400 MB)

# One subprocess runs every case in turn (a start of torch costs seconds): for each, its exit code,
# its stderr, its time and the process's peak RSS so far (so a case's peak is at most that). The peak is
# VmHWM of the process's own memory: getrusage's ru_maxrss also keeps the peak of the memory the process
# had before exec, a copy of the test runner's (which the suite grows past 1 GB by this point).
CHILD = """
import contextlib, io, json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
from ckdiff.cli import main

def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    out.append(dict(code=code, err=err.getvalue(), took=time.monotonic() - t0, rss=hwm()))
print(json.dumps(out))
"""

CASES: dict = {}  # name -> (argv, file named, words)


def case(name, named, *argv, words=()):
    CASES[name] = ([str(a) for a in argv], str(named), list(words))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("bombs")
    for build in BUILDERS:
        d = base / build.__name__
        d.mkdir()
        build(d)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    names = list(CASES)
    p = subprocess.run([sys.executable, "-c", CHILD.format(cap=CAP), json.dumps([CASES[n][0] for n in names])],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return dict(zip(names, json.loads(p.stdout.strip().splitlines()[-1])))


def _refused(results, name, limit=45, peak=PEAK_RSS):
    r = results[name]
    _, named, words = CASES[name]
    lines = r["err"].strip().splitlines()
    assert r["code"] == 2 and len(lines) == 1 and lines[0].startswith("ckdiff: error:"), (name, r)
    assert named in lines[0], (name, lines[0])
    for w in words:
        assert w in lines[0], (name, lines[0])
    assert r["rss"] < peak, f"{name}: peak RSS {r['rss']}"
    assert r["took"] < limit, f"{name}: {r['took']:.1f} s"


BUILDERS = []


def builder(f):
    BUILDERS.append(f)
    return f


# ------------------------------------------------------------------ pickles
P2 = b"\x80\x02"
MEMO_BOMB = P2 + b"}" + b"r" + struct.pack("<I", 1 << 28) + b"."  # EMPTY_DICT, LONG_BINPUT 2**28, STOP


def _long(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


BYTEARRAY_BOMB = P2 + b"cbuiltins\nbytearray\n" + _long(1 << 32) + b"\x85R."  # bytearray(2**32)
FLOATTENSOR_BOMB = P2 + b"ctorch\nFloatTensor\n" + _long(1 << 30) + b"\x85R."  # torch.FloatTensor(2**30)
DEEP = 300_000
DEEP_TUPLE = P2 + b"}" + b")" + b"\x85" * DEEP + b"N" + b"s" + b"."  # {(((...),),): None}, 300k deep


def _archive(pkl: bytes, records=None, compress=zipfile.ZIP_STORED) -> bytes:
    """A torch.save-shaped zip: archive/data.pkl, byteorder, version, and data records."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for k, v in (records or {}).items():
            z.writestr(f"archive/data/{k}", v)
    return buf.getvalue()


# Object-count bombs, each op a few bytes: 2**23 empty sets appended to a list (1.9 GB of sets from an 8 MiB
# pickle), and 2**25 NONE/POP pairs (nothing kept, 2**26 opcodes: ~100 s in a pure-Python unpickler)
SET_BOMB = b"\x80\x04]" + b"(" + b"\x8f" * (1 << 23) + b"e."
OPS_BOMB = P2 + b"N0" * (1 << 25) + b"N."
PICKLE_BOMBS = {"memo 2**28": (MEMO_BOMB, "memo index"), "bytearray(2**32)": (BYTEARRAY_BOMB, "builtins.bytearray"),
                "torch.FloatTensor(2**30)": (FLOATTENSOR_BOMB, "torch.FloatTensor"),
                "300k-deep tuple key": (DEEP_TUPLE, "nested more than"),
                "2**23 empty sets": (SET_BOMB, "MiB"), "2**26 opcodes": (OPS_BOMB, "opcodes")}


@builder
def torch_file_bombs(d):
    for i, (bomb, (pkl, words)) in enumerate(PICKLE_BOMBS.items()):
        p = d / f"m{i}.pt"
        p.write_bytes(_archive(pkl))
        case(f"torch file: {bomb}", p, "inspect", p, words=[words])


def _mcore(d):
    from ckdiff.formats.mcore import write_mcore
    from ckdiff.golden.models import hf_state, tiny_config
    cfg = tiny_config("llama-gqa")
    return write_mcore(d / "mc", hf_state(cfg), cfg, common="common.pt")


@builder
def mcore_bombs(d):
    for bomb in ("memo 2**28", "300k-deep tuple key", "2**23 empty sets"):
        pkl, words = PICKLE_BOMBS[bomb]
        root = _mcore(d / bomb.split()[0])
        common = root / "iter_0000010" / "common.pt"
        common.write_bytes(_archive(pkl))
        case(f"mcore common.pt: {bomb}", common, "inspect", root, words=[words])
        if bomb == "2**23 empty sets":
            continue  # DCP metadata: test_dcp_metadata_object_bomb_is_capped, in a process of its own
        root2 = _mcore(d / (bomb.split()[0] + "-meta"))
        meta = root2 / "iter_0000010" / ".metadata"
        meta.write_bytes(pkl)
        case(f"dcp .metadata: {bomb}", meta, "inspect", root2, words=[words])


@pytest.mark.parametrize("name", [f"torch file: {b}" for b in PICKLE_BOMBS] + [
    f"{w}: {b}" for w in ("mcore common.pt", "dcp .metadata") for b in ("memo 2**28", "300k-deep tuple key")] + [
    "mcore common.pt: 2**23 empty sets"])
def test_pickle_bombs(results, name):
    """Refused before anything runs: the opcode pre-scan checks structure, memo order, depth, opcodes and
    the bytes its objects would take (io/pickle_scan.py)."""
    _refused(results, name)


def test_dcp_metadata_object_bomb_is_capped(tmp_path):
    """DCP metadata runs through the C unpickler (a real 10^6-chunk metadata is ~10^8 opcodes) under an
    address-space cap of 1.5 GiB above what the process holds (io/dcp_pickle.py): the bomb ends in one
    line, under the 2 GB a refusal may cost, in a process of its own (its peak would count against the
    cases that follow it in the shared one)."""
    root = _mcore(tmp_path)
    meta = root / "iter_0000010" / ".metadata"
    meta.write_bytes(SET_BOMB)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", CHILD.format(cap=CAP), json.dumps([["inspect", str(root)]])],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])[0]
    lines = r["err"].strip().splitlines()
    assert r["code"] == 2 and len(lines) == 1 and ".metadata" in lines[0] and "MiB" in lines[0], r
    assert r["rss"] < 2 << 30 and r["took"] < 45, r


def _dcp_with_chunk(d, blob: bytes, n=4):
    """A DCP directory (torch.distributed.checkpoint.save) whose tensor's chunk is replaced by ``blob``."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from helpers import dcp_save
    root = d / "ck"
    dcp_save({"a": torch.randn(n, n)}, root)
    md = pickle.loads((root / ".metadata").read_bytes())  # our own fixture: trusted here
    (root / "x.distcp").write_bytes(blob)
    idx = next(k for k in md.storage_data if k.fqn == "a")
    md.storage_data[idx] = _StorageInfo("x.distcp", 0, len(blob))
    (root / ".metadata").write_bytes(pickle.dumps(md))
    good = d / "good"
    dcp_save({"a": torch.randn(n, n)}, good)
    return root, good


@builder
def deflated_chunk(d):
    """A chunk archive whose data record is deflated (torch writes stored records): never inflated."""
    buf = io.BytesIO()
    torch.save(torch.zeros(4, 4), buf)
    with zipfile.ZipFile(buf) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    root, good = _dcp_with_chunk(d, _archive(pkl, {"0": bytes(256 << 20)}, zipfile.ZIP_DEFLATED))
    case("deflated chunk", "x.distcp", root, good, words=["compressed"])


@builder
def stride0_chunk(d):
    """A chunk archive holding 4 bytes behind a stride-0 view, padded to the chunk's length."""
    n = 1 << 10
    buf = io.BytesIO()
    torch.save(torch.zeros(1).expand(n, n), buf)  # torch.save keeps the 4-byte storage and the stride-0 view
    with zipfile.ZipFile(buf, "a") as z:  # padded inside the archive to the chunk's byte length
        z.writestr("archive/pad", bytes(n * n * 4))
    root, good = _dcp_with_chunk(d, buf.getvalue(), n)
    case("stride-0 chunk", "x.distcp", root, good, words=["reuses its storage"])


@builder
def sparse_common_state(d):
    root = _mcore(d)
    common = root / "iter_0000010" / "common.pt"
    with open(common, "r+b") as f:  # the real archive, then 3 GiB of holes
        f.truncate(3 << 30)
    case("sparse 3 GiB common.pt", common, "inspect", root)


def _claim(d, name, size):
    """A DCP directory whose one tensor claims ``size`` in one chunk (the archive holds 16 floats)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from helpers import dcp_save
    root = d / name
    dcp_save({"a": torch.randn(4, 4)}, root)
    md = pickle.loads((root / ".metadata").read_bytes())  # our own fixture: trusted here
    tsm = md.state_dict_metadata["a"]
    off = torch.Size([0] * len(size))
    tsm.size = torch.Size(size)
    tsm.chunks = [ChunkStorageMetadata(off, torch.Size(size))]
    (info,) = md.storage_data.values()
    md.storage_data = {MetadataIndex("a", off, 0): info}
    (root / ".metadata").write_bytes(pickle.dumps(md))
    case(f"dcp claims {name}", "__0_0.distcp", "inspect", root, words=["claims"])


@builder
def dcp_claims(d):
    _claim(d, "1 TiB", (1 << 18, 1 << 20))
    _claim(d, "2**70 elements", (1 << 35, 1 << 35))


@pytest.mark.parametrize("name", ["deflated chunk", "stride-0 chunk", "sparse 3 GiB common.pt", "dcp claims 1 TiB",
                                  "dcp claims 2**70 elements"])
def test_claims_bounded_by_what_the_file_holds(results, name):
    _refused(results, name)
