"""torch pickles (.bin / .pt / .pth): loaded with ``weights_only=True`` only.

Anything that needs more than torch's restricted unpickler (plus an explicit
allowlist of harmless types such as ``argparse.Namespace``) is refused unless
the user opts in with ``--trust-pickle``, which runs arbitrary code by design.
"""
from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import InputError
from .inputs import open_input
from .lazy import EagerTensor, LazyTensor

# Types Megatron rank files need beyond tensors and containers.
SAFE_GLOBALS = [argparse.Namespace]


def load_pickle(path, trust: bool = False) -> object:
    """Load a torch pickle without executing code (unless ``trust``)."""
    path = Path(path)
    with open_input(path) as f:  # a regular file (links followed) before torch opens it: never a FIFO
        magic = f.read(2)
    if magic not in (b"PK", b"") and magic[:1] != b"\x80":  # torch writes a zip, or a pickle of protocol >= 2
        raise InputError(path, "not a torch zip or pickle file")
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a directory, expected a torch pickle file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file")
    try:
        is_zip = zipfile.is_zipfile(path)
    except Exception:  # noqa: BLE001 - a mangled zip directory can make the probe itself raise
        is_zip = False
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=is_zip)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except PermissionError as e:
        raise InputError(path, f"cannot read: {e.strerror}") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        reason = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), "")
        if reason.startswith("Unsupported operand"):  # the opcode would quote a byte of the file
            reason = "unsupported pickle opcode"
        raise InputError(path, "refused to unpickle: needs more than plain tensors "
                               f"({reason or 'unsafe content'}); pass --trust-pickle only if you "
                               "trust this file, since it can run code") from None
    except Exception as e:  # noqa: BLE001 - whatever a corrupt file makes torch raise, it is an input error
        raise InputError(path, f"not a readable torch checkpoint ({_reason(e)})") from None


def _reason(e: Exception) -> str:
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


def layout_problem(t: torch.Tensor) -> str | None:
    """Why a loaded tensor cannot be trusted to be what its shape says, or None.

    A pickle stores a storage plus (offset, shape, strides); a tensor whose strides overlap
    (a stride-0 ``expand`` of 1 KB claiming 16 GiB) materialises to far more memory than the file
    holds. Accepted: strided, non-overlapping elements inside the storage (views, transposes,
    slices of a larger storage and storages shared by tied weights all qualify).
    """
    if t.layout != torch.strided:
        return f"has the {t.layout} layout; only dense tensors are supported"
    if t.is_quantized:
        return "is a torch quantized tensor; not supported"
    if t.numel() == 0:
        return None
    span = 1  # elements reached by the dimensions checked so far, innermost (smallest stride) first
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride < span:
            return (f"shape {list(t.shape)} with strides {list(t.stride())} reuses its storage "
                    f"({t.numel() * t.element_size()} bytes claimed from {t.untyped_storage().nbytes()} stored)")
        span += stride * (size - 1)
    if (t.storage_offset() + span) * t.element_size() > t.untyped_storage().nbytes():
        return f"shape {list(t.shape)} with strides {list(t.stride())} reaches past its storage"
    return None


def checked_state(path, obj) -> dict[str, torch.Tensor]:
    """``flatten_state`` plus a layout check of every tensor, before any data is materialised."""
    try:
        flat = flatten_state(obj)
    except RecursionError:
        raise InputError(path, "nested too deeply to be a state dict") from None
    for name, t in flat.items():
        problem = layout_problem(t)
        if problem:
            raise InputError(path, f"tensor {name!r} {problem}; refusing it")
    return flat
