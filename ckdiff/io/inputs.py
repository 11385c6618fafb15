"""Opening input files: every file a reader opens goes through ``open_input``.

A path must name a regular file (after following symbolic links) before it is
opened, so a FIFO, a socket or a device can never block a reader or be read
with side effects; the open itself is non-blocking and the type is checked
again on the open descriptor, so a swap between the two checks is caught too.
Operating-system failures (a symbolic-link loop, a name too long, no
permission) become one-line ``InputError``s naming the path. No message
quotes a file's contents.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import os
import stat
from pathlib import Path


from ckdiff.errors import InputError

_PROBLEMS = {
    errno.ENOENT: "no such file or directory",
    errno.ELOOP: "symbolic link loop (or too many levels of symbolic links)",
    errno.ENAMETOOLONG: "file name too long",
    errno.EACCES: "cannot read: permission denied",
    errno.EPERM: "cannot read: operation not permitted",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.EISDIR: "is a directory, expected a file",
}


def os_problem(e: OSError) -> str:
    """A short description of why the operating system refused a path."""
    return _PROBLEMS.get(e.errno) or f"cannot read: {(e.strerror or e.__class__.__name__).lower()}"


def kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


# Every file and directory read as an input in this process, by identity (device, inode) so that a
# hard link or another spelling of the same file is recognised: a report is never written onto one.
_INPUT_FILES: set = set()
_INPUT_DIRS: set = set()


def reset_inputs() -> None:
    """Forget the inputs recorded so far: each command starts afresh (a process that runs several commands,
    a test session or a notebook, must not refuse a report target because an earlier command read a file
    whose inode has since been reused)."""
    _INPUT_FILES.clear()
    _INPUT_DIRS.clear()


def note_input(path, st: os.stat_result | None = None) -> None:
    """Record ``path`` (a file or a directory) as an input of this run."""
    try:
        st = st or os.stat(path)
    except (OSError, ValueError):
        return
    (_INPUT_DIRS if stat.S_ISDIR(st.st_mode) else _INPUT_FILES).add((st.st_dev, st.st_ino))


def is_input(path) -> bool:
    """Whether ``path`` is a file read as an input, or an existing file inside an input directory."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return False
    if (st.st_dev, st.st_ino) in _INPUT_FILES or (st.st_dev, st.st_ino) in _INPUT_DIRS:
        return True
    parent = os.path.dirname(os.path.realpath(path))
    while True:
        try:
            ps = os.stat(parent)
        except OSError:
            return False
        if (ps.st_dev, ps.st_ino) in _INPUT_DIRS:
            return True
        up = os.path.dirname(parent)
        if up == parent:
            return False
        parent = up


def stat_input(path) -> os.stat_result:
    """``os.stat`` of an input path (symbolic links followed), errors as one line naming it."""
    try:
        st = os.stat(path)
        note_input(path, st)
        return st
    except OSError as e:
        if e.errno == errno.ENOENT and os.path.islink(path):
            raise InputError(path, "symbolic link to a missing file") from None
        raise InputError(path, os_problem(e)) from None
    except ValueError:  # an embedded NUL byte
        raise InputError(path, "path holds a NUL byte") from None


def _require_regular(path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise InputError(path, f"is {kind_of(mode)}, expected a regular file; refusing to open it")


def open_input(path):
    """Open ``path`` for binary reading, only if it is a regular file (symbolic links followed)."""
    _require_regular(path, stat_input(path).st_mode)  # before opening: opening a device can act
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise InputError(path, os_problem(e)) from None
    try:
        _require_regular(path, os.fstat(fd).st_mode)  # the file actually opened
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_input(path, limit: int | None = None) -> bytes:
    """The bytes of a regular file; with ``limit``, refuse a file longer than that."""
    with open_input(path) as f:
        try:
            data = f.read() if limit is None else f.read(limit + 1)
        except OSError as e:
            raise InputError(path, os_problem(e)) from None
    if limit is not None and len(data) > limit:
        raise InputError(path, f"longer than the {limit} bytes such a file can hold")
    return data


@contextlib.contextmanager
def no_gc():
    """Pause the cyclic garbage collector while building many acyclic objects (JSON of a million
    entries): its collections would otherwise rescan everything built so far, again and again."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def parse_json(path, raw: bytes, what: str = "JSON"):
    """Parse strict JSON; defects, including nesting too deep to parse, name the file, never its text."""
    try:
        with no_gc():
            return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise InputError(path, f"invalid {what}: not UTF-8 (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"invalid {what} ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:
        raise InputError(path, f"invalid {what} ({e})") from None
    except RecursionError:
        raise InputError(path, f"invalid {what}: nested too deeply") from None


def read_json_object(path) -> dict:
    """A JSON file that must hold an object (config.json, params.json, an index)."""
    data = parse_json(path, read_input(path))
    if not isinstance(data, dict):
        raise InputError(path, "expected a JSON object")
    return data


def inside_root(root: Path, rel: str, real_root: Path | None = None) -> Path:
    """``root/rel``, refusing names that escape ``root`` (``real_root``: ``root`` resolved, if known)."""
    if "\x00" in rel:
        raise InputError(root, f"shard path {rel!r} holds a NUL byte")
    try:
        p = (root / rel).resolve()
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(root, f"shard path {rel!r} cannot be resolved ({e.__class__.__name__})") from None
    if os.path.isabs(rel) or (real_root or root.resolve()) not in p.parents:
        raise InputError(root, f"shard path {rel!r} escapes the checkpoint directory")
    return p
