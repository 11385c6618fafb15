"""The weight files of a model directory and their index, without torch: which files hold the tensors
(``model.safetensors.index.json`` or every ``*.safetensors``), and the index's ``weight_map`` checked against
what the files hold. Shared by the readers (formats/readers.py) and the torch-free comparison (compare/lane.py),
so both read a directory alike."""
from __future__ import annotations

import os
from pathlib import Path

from ckdiff.errors import InputError
from ckdiff.io.inputs import inside_root, read_json_object


def _json(path: Path) -> dict:
    return read_json_object(path)


def _merge_files(files: list[Path], read_one, root: Path) -> dict:
    out: dict = {}
    for f in files:
        for k, t in read_one(f).items():
            if k in out:
                raise InputError(f, f"tensor {k!r} also appears in {out[k].origin}")
            out[k] = t
    return out


def _read_indexed(root: Path, index: Path, read_one) -> dict:
    data = _json(index)
    wm = data.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise InputError(index, "has no weight_map")
    shard_of: dict[str, Path] = {}  # each shard name is resolved and checked once
    real_root = root.resolve()
    for key, rel in wm.items():
        if not isinstance(rel, str):
            raise InputError(index, f"weight_map entry for {key!r} is not a file name")
        if rel in shard_of:
            continue
        p = shard_of[rel] = inside_root(root, rel, real_root)
        try:
            is_file = p.is_file()
        except OSError:
            is_file = False
        if not is_file:
            raise InputError(index, f"names shard {rel!r}, which is missing or not a regular file")
    files = {p: rel for rel, p in shard_of.items()}  # two names of one file are read once
    tensors = _merge_files(sorted(files), read_one, root)
    origins = {rel: str(p) for rel, p in shard_of.items()}
    for k, rel in wm.items():
        t = tensors.get(k)
        if t is None or t.origin != origins[rel]:
            raise InputError(index, f"maps {k!r} to {shard_of[rel].name}, which does not hold it")
    return {k: tensors[k] for k in wm}


def _hf_weight_files(p: Path):
    for idx in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.lexists(p / idx):  # a FIFO or a broken link here is an error, not a missing index
            return "index", p / idx
    st = sorted(p.glob("*.safetensors"))
    if st:
        return "files", st
    bins = sorted(p.glob("pytorch_model*.bin"))
    if bins:
        return "files", bins
    return None, None
