"""Distributed runs that go wrong: a rank outside the world, a master that never comes, a parent that
is killed. Each ends promptly with one line (or with no orphan left running)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckdiff.golden.emit import emit

ROOT = Path(__file__).resolve().parents[1]


def _env(**kw):
    e = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    e.update({k: str(v) for k, v in kw.items()})
    return e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return emit(tmp_path_factory.mktemp("w") / "m", "llama-gqa", "hf")


def _one_line_exit_2(proc, *words):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("ckdiff: error:"), proc.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def test_rank_not_below_world_size_is_refused_up_front(model):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "ckdiff", model, model], capture_output=True, text=True, timeout=120,
                       env=_env(RANK=5, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port()))
    _one_line_exit_2(p, "RANK=5 is not below WORLD_SIZE=2")
    assert time.monotonic() - t0 < 60


def test_a_master_that_never_comes_ends_in_one_line(model):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "ckdiff", model, model], capture_output=True, text=True, timeout=120,
                       env=_env(RANK=1, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port(),
                                CKDIFF_DIST_CONNECT_TIMEOUT=3))
    _one_line_exit_2(p, "rank 1 cannot reach the master at 127.0.0.1:", "within 3 s")
    assert time.monotonic() - t0 < 60


def _children(pid: int) -> list:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc to find the worker")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_die_with_their_parent(model, sig):
    parent = subprocess.Popen([sys.executable, "-m", "ckdiff", model, model, "--workers", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(CKDIFF_DIST_TIMEOUT=600))
    try:
        deadline = time.monotonic() + 60
        workers = []
        while not workers and time.monotonic() < deadline and parent.poll() is None:
            workers = _children(parent.pid)
            time.sleep(0.05)
        assert workers, "rank 1 never started"
        parent.send_signal(sig)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [w for w in workers if _alive(w)]
        for w in left:  # do not leave it behind if the test fails
            os.kill(w, signal.SIGKILL)
        assert not left, f"worker outlived its parent ({sig.name})"
    finally:
        if parent.poll() is None:
            parent.kill()
