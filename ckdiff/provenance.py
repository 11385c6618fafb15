"""The verification record of a result: what ran, on what, with which tools.

``record(command, inputs, full_hash)`` returns the ``provenance`` object of the JSON result: ckdiff's
version and source commit (when it runs from a git checkout), the versions of Python and of the
libraries that decide numbers (torch, numpy, numba, safetensors, gguf, transformers), the command line
as a string and as arguments with the directory it ran in, and a fingerprint of every input file: its
size and the SHA-256 of its header (a safetensors file's 8-byte length and JSON header, which name every
tensor's dtype, shape and offsets; the first MiB of any other file), and with ``full_hash`` the SHA-256 of
its whole content. ``ckdiff replay`` re-runs the command and compares verdicts; the fingerprints say
which input changed in between.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import struct
import subprocess
from pathlib import Path
from typing import Optional

HEAD = 1 << 20  # bytes hashed of a file that is not safetensors
MAX_HEADER = 100 << 20  # a safetensors header larger than this is hashed as its first HEAD bytes
BLOCK = 8 << 20
LIBRARIES = ("torch", "numpy", "numba", "safetensors", "gguf", "transformers")


def versions() -> dict:
    """Installed versions, read from the package metadata (nothing is imported)."""
    import platform
    from importlib import metadata

    from ckdiff import __version__
    out = {"ckdiff": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> Optional[dict]:
    """{"commit", "dirty"} of the checkout ckdiff runs from, None when it is not a git checkout of ckdiff
    (an installed wheel, or git missing)."""
    pkg = Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=pkg, capture_output=True, text=True,
                             timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip(), "ckdiff", "provenance.py").resolve() != Path(__file__).resolve():
            return None  # inside some other repository (a virtual environment in a project), not ckdiff's
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pkg, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=pkg,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}


def _header_span(path: Path, size: int) -> int:
    """Bytes of ``path`` that are its header: 8 + N for a safetensors file, else the first HEAD bytes."""
    if path.suffix == ".safetensors" and size >= 8:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n <= min(size, MAX_HEADER):
            return 8 + n
    return min(size, HEAD)


def fingerprint(path, full_hash: bool = False) -> dict:
    """{"path", "size", "header_bytes", "header_sha256"[, "sha256"]} of one file (streamed)."""
    p = Path(path)
    size = p.stat().st_size
    span = _header_span(p, size)
    out = {"path": str(p.resolve()), "size": size, "header_bytes": span}
    with open(p, "rb") as f:
        out["header_sha256"] = hashlib.sha256(f.read(span)).hexdigest()
        if full_hash:
            f.seek(0)
            h = hashlib.sha256()
            for block in iter(lambda: f.read(BLOCK), b""):
                h.update(block)
            out["sha256"] = h.hexdigest()
    return out


def input_files(ck) -> list[Path]:
    """The files of one input: a path's file, or its directory's top-level files; a read checkpoint's
    tensor files as well (shards in subdirectories included)."""
    if ck is None:
        return []
    root = Path(ck if isinstance(ck, (str, os.PathLike)) else ck.path)
    files = {Path(f) for f in ([] if isinstance(ck, (str, os.PathLike)) else ck.meta.get("files") or [])}
    if root.is_file():
        files.add(root)
    elif root.is_dir():
        files |= {f for f in root.iterdir() if f.is_file() and not f.is_symlink()}
    return sorted(files)


def describe_input(ck, full_hash: bool = False) -> dict:
    given = isinstance(ck, (str, os.PathLike))  # a path the command did not read itself (roundtrip's source)
    out = {"path": str(ck if given else ck.path), "format": None if given else ck.format}
    out["files"] = []
    for f in input_files(ck):
        try:
            out["files"].append(fingerprint(f, full_hash))
        except OSError as e:  # unreadable or gone since it was compared: recorded, never fatal after the work
            out["files"].append({"path": str(f), "error": (e.strerror or str(e)).lower()})
    return out


def record(command: str, inputs=(), full_hash: bool = False) -> dict:
    """The provenance object of a result (see the module docstring)."""
    return {"versions": versions(), "source": git_commit(), "command": command,
            "argv": shlex.split(command)[1:] if command else [], "cwd": os.getcwd(),
            "inputs": [describe_input(ck, full_hash) for ck in inputs if ck is not None],
            "full_hash": bool(full_hash)}


def changed_inputs(old: list, new: list) -> list[str]:
    """One line per input file whose fingerprint differs between two records (added/removed included)."""
    def index(rec):
        return {f["path"]: f for i in rec for f in i.get("files", [])}
    a, b = index(old), index(new)
    out = []
    for p in sorted(set(a) | set(b)):
        if p not in a or p not in b:
            out.append(f"{p}: {'added' if p not in a else 'removed'}")
            continue
        keys = [k for k in ("size", "header_sha256", "sha256") if k in a[p] and k in b[p] and a[p][k] != b[p][k]]
        if keys:
            out.append(f"{p}: {', '.join(k.replace('_sha256', ' hash').replace('sha256', 'content hash') for k in keys)} changed")
    return out


__all__ = ["record", "fingerprint", "versions", "git_commit", "changed_inputs"]
