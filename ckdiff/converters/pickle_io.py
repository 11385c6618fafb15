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
from .lazy import EagerTensor, LazyTensor

# Types Megatron rank files need beyond tensors and containers.
SAFE_GLOBALS = [argparse.Namespace]


def load_pickle(path, trust: bool = False) -> object:
    """Load a torch pickle without executing code (unless ``trust``)."""
    path = Path(path)
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
        raise InputError(path, "refused to unpickle: needs more than plain tensors "
                               f"({reason or 'unsafe content'}); pass --trust-pickle only if you "
                               "trust this file, since it can run code") from None
    except Exception as e:  # noqa: BLE001 - whatever a corrupt file makes torch raise, it is an input error
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise InputError(path, f"not a readable torch checkpoint ({msg[:200]})") from None


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
    flat = flatten_state(obj)
    if not flat and obj:
        raise InputError(path, "holds no tensors")
    return {k: EagerTensor(k, v, str(path)) for k, v in flat.items()}
