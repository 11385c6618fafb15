"""torch pickles (.bin / .pt / .pth, Meta shards, Megatron-LLM rank files): read under the torch
policy of io/unpickle.py (plain data, tensors, ``argparse.Namespace``, inert foreign
values), never by ``pickle.load``. Anything else is refused unless the user opts in with
``--trust-pickle``, which runs arbitrary code by design.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from ckdiff.errors import InputError
from ckdiff.io.inputs import open_input
from ckdiff.tensor.lazy import EagerTensor, LazyTensor
from ckdiff.io.unpickle import layout_problem, load_torch


def load_pickle(path, trust: bool = False) -> object:
    """Load a torch pickle without executing code: the restricted unpickler of io/unpickle.py
    for zip archives and legacy files alike; ``trust`` (``--trust-pickle``) hands the file to
    ``torch.load(weights_only=False)``, which runs whatever the file says."""
    path = Path(path)
    if not trust:
        try:
            return load_torch(path)
        except InputError as e:
            if "is not allowed" not in e.problem:
                raise
            raise InputError(path, f"{e.problem}; pass --trust-pickle only if you trust this file, "
                                   "since it can run code") from None
    with open_input(path):  # a regular file (links followed) before torch opens it: never a FIFO
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - whatever a corrupt file makes torch raise, it is an input error
        raise InputError(path, f"not a readable torch checkpoint ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    """torch's reason for refusing a file, without the bytes of the file it may quote."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
    if "invalid load key" in msg:
        return "not a torch zip or pickle: invalid load key"  # torch quotes the file's first byte
    return msg[:200]


def flatten_state(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dicts of tensors -> flat ``a.b.c`` names (non-tensors skipped)."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten_state(v, f"{prefix}{k}."))
    return out


def read_pickle_tensors(path, trust: bool = False) -> dict[str, LazyTensor]:
    obj = load_pickle(path, trust)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(path, f"expected a dict of tensors, found {type(obj).__name__}")
    flat = checked_state(path, obj)
    if not flat and obj:
        raise InputError(path, "holds no tensors")
    return {k: EagerTensor(k, v, str(path)) for k, v in flat.items()}


def _tensor_problem(t: torch.Tensor) -> str | None:
    """``layout_problem`` of a loaded tensor (one from ``--trust-pickle`` was built by torch unchecked)."""
    if t.layout != torch.strided:
        return f"has the {t.layout} layout; only dense tensors are supported"
    if t.is_quantized:
        return "is a torch quantized tensor; not supported"
    return layout_problem(tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.element_size(),
                          t.untyped_storage().nbytes())


def checked_state(path, obj) -> dict[str, torch.Tensor]:
    """``flatten_state`` plus a layout check of every tensor, before any data is materialised."""
    try:
        flat = flatten_state(obj)
    except RecursionError:
        raise InputError(path, "nested too deeply to be a state dict") from None
    for name, t in flat.items():
        problem = _tensor_problem(t)
        if problem:
            raise InputError(path, f"tensor {name!r} {problem}; refusing it")
    return flat
