"""Sharding a comparison over torch.distributed ranks (torchrun, SLURM, or ``--workers N``).

Rank 0 plans: the jobs (one per tensor, with its bytes) are assigned to ranks, largest first to the
least loaded rank. Every rank reads only its own tensors' bytes and runs the same single-pass code
as a single process; results are gathered to rank 0 in the original order, so the result is the
one a single process computes. A failure on any rank becomes the same one-line error on every
rank. Nothing here prints.

Backends: ``gloo`` (CPU, what CI has) unless CUDA is present (``nccl``); ``CKDIFF_DIST_BACKEND``
overrides. Collectives time out after ``CKDIFF_DIST_TIMEOUT`` seconds (default 1800), so a rank
that disappears never makes the others wait forever; torchrun also stops the other workers when
one dies, and ``--workers`` does the same for its local processes.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from ckdiff.errors import CkdiffError

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ABORT_CLEANUP: set = set()  # temporary output directories to remove if the run is aborted


class DistError(CkdiffError):
    """A failure on some rank, reported the same way on every rank."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self):
        return self.message


def launched() -> bool:
    """True in a process started by torchrun/SLURM-style launchers (or --workers) with several ranks."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def assign(sizes: Sequence[int], world: int) -> list[int]:
    """Rank of each job: largest first onto the least loaded rank (ties: lowest rank)."""
    load = [0] * world
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += sizes[i]
    return out


@dataclass
class Shard:
    rank: int
    world: int
    explain: Optional[object] = None  # () -> str naming a dead local worker, set by LocalWorkers

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _dist(self):
        import torch.distributed as dist
        return dist

    def map(self, jobs: list) -> Optional[list]:
        """Run ``jobs`` [(name, bytes, fn)] spread over the ranks; results in job order on rank 0."""
        dist = self._dist()
        plan = [assign([nb for _, nb, _ in jobs], self.world) if self.is_main else None]
        self._collective(dist.broadcast_object_list, plan, src=0)
        if os.environ.get("CKDIFF_TEST_KILL_RANK") == str(self.rank):  # fault-injection hook for the tests
            os.kill(os.getpid(), signal.SIGKILL)
        mine, err = {}, None
        for i, r in enumerate(plan[0]):
            if r != self.rank:
                continue
            try:
                mine[i] = jobs[i][2]()
            except CkdiffError as e:
                err = str(e)
                break
            except Exception as e:  # noqa: BLE001 - reported on every rank as one line
                err = f"internal error on rank {self.rank} ({jobs[i][0]}): {type(e).__name__}: {e}"
                break
        gathered = [None] * self.world if self.is_main else None
        self._collective(dist.gather_object, (mine, err), gathered, dst=0)
        first = [next((e for _, e in gathered if e), None) if self.is_main else None]
        self._collective(dist.broadcast_object_list, first, src=0)
        if first[0]:
            raise DistError(first[0])
        if not self.is_main:
            return None
        merged: dict = {}
        for part, _ in gathered:
            merged.update(part)
        return [merged[i] for i in range(len(jobs))]

    def agree(self, value):
        """Rank 0's ``value`` on every rank (e.g. the exit code)."""
        box = [value if self.is_main else None]
        self._collective(self._dist().broadcast_object_list, box, src=0)
        return box[0]

    def _collective(self, fn, *args, **kw):
        try:
            fn(*args, **kw)
        except DistError:
            raise
        except Exception as e:  # noqa: BLE001 - a rank vanished or timed out
            known = self.explain() if self.explain else None
            if known:
                raise DistError(known) from None
            raise DistError(f"rank {self.rank}: another rank stopped answering ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else 'no detail'})") from None


def _env_number(key: str, default: str, kind=float, low=0):
    raw = os.environ.get(key, default)
    try:
        v = kind(raw)
    except ValueError:
        raise DistError(f"{key}={raw[:40]!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if not v >= low or v != v:
        raise DistError(f"{key}={raw[:40]!r}: expected at least {low}")
    return v


class _QuietStderr:
    """Send the process's C-level stderr to /dev/null for a while: c10d's store client logs a line per
    failed connection attempt, which would bury the one-line error."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        return False


def init_from_env() -> Shard:
    """Join the process group described by the launcher's environment.

    RANK, WORLD_SIZE and MASTER_PORT are checked first (RANK below WORLD_SIZE); the connection to the
    master's store waits ``CKDIFF_DIST_CONNECT_TIMEOUT`` seconds (default 300), then ends in one line.
    """
    import torch
    import torch.distributed as dist
    timeout = _env_number("CKDIFF_DIST_TIMEOUT", "1800", float, 1)
    connect = _env_number("CKDIFF_DIST_CONNECT_TIMEOUT", "300", float, 1)
    world = _env_number("WORLD_SIZE", "1", int, 1)
    rank = _env_number("RANK", "0", int, 0)
    if rank >= world:
        raise DistError(f"RANK={rank} is not below WORLD_SIZE={world}: ranks are 0..{world - 1}")
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = _env_number("MASTER_PORT", "29500", int, 1)
    if port > 65535:
        raise DistError(f"MASTER_PORT={port}: not a TCP port")
    backend = os.environ.get("CKDIFF_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        try:
            with _QuietStderr():
                # under torchrun the agent hosts the store and every rank is a client (torch's env:// rule)
                master = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
                store = dist.TCPStore(host, port, world, master, timeout=datetime.timedelta(seconds=connect))
        except Exception as e:  # noqa: BLE001 - the master is unreachable (never came, wrong address)
            raise DistError(f"rank {rank} cannot reach the master at {host[:80]}:{port} within {connect:g} s "
                            f"({type(e).__name__}); is rank 0 running? (CKDIFF_DIST_CONNECT_TIMEOUT sets the wait)"
                            ) from None
        try:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout))
        except Exception as e:  # noqa: BLE001
            raise DistError(f"cannot join the process group ({backend}): {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    _share_cores()
    return Shard(dist.get_rank(), dist.get_world_size())


def _share_cores() -> None:
    """Ranks on one machine split its cores instead of each starting a thread per core."""
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return
    if local <= 1:
        return
    import numba
    import torch
    n = max(1, (os.cpu_count() or 1) // local)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(n)


def shutdown() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with(parent: int):
    """For ``Popen(preexec_fn=...)``: the worker gets SIGKILL when this process ends, however it ends
    (SIGKILL included), through Linux's PR_SET_PDEATHSIG; if the parent is already gone, it exits."""
    def setup():
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):  # not Linux: the watcher below the workers still stops them
            return
        if os.getppid() != parent:
            os._exit(2)
    return setup


class LocalWorkers:
    """``--workers N`` on one machine: this process is rank 0, N-1 local processes run the same
    command as ranks 1..N-1 (same machinery as torchrun, on 127.0.0.1). If a worker dies, this
    process stops the others and ends with a one-line error instead of waiting."""

    def __init__(self, n: int, argv: Sequence[str], on_failure):
        self.n, self.args, self.on_failure = n, list(argv), on_failure
        self.procs: list = []

    def __enter__(self) -> Shard:
        port = _free_port()
        base = {**os.environ, "WORLD_SIZE": str(self.n), "LOCAL_WORLD_SIZE": str(self.n),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        for r in range(1, self.n):
            env = {**base, "RANK": str(r), "LOCAL_RANK": str(r)}
            self.procs.append(subprocess.Popen([sys.executable, "-m", "ckdiff", *self.args], env=env,
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL, preexec_fn=_die_with(os.getpid())))
        os.environ.update({k: base[k] for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")})
        os.environ.update(RANK="0", LOCAL_RANK="0")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._claimed = False  # who reports a dead worker: the watcher or the main thread, never both
        threading.Thread(target=self._watch, daemon=True).start()
        shard = init_from_env()
        shard.explain = self._dead
        return shard

    def _claim(self) -> bool:
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def _dead(self) -> Optional[str]:
        """The first worker that died, waiting a moment for the one whose socket just closed."""
        if not self._claim():  # the watcher is reporting it and ending the process
            time.sleep(60)
        for _ in range(20):
            for r, p in enumerate(self.procs, 1):
                code = p.poll()
                if code not in (None, 0, 1, 2):
                    how = f"signal {-code}" if code < 0 else f"exit {code}"
                    return f"worker rank {r} died ({how}); stopped the others"
            time.sleep(0.1)
        return None

    def _watch(self):
        while not self._stop.wait(0.2):
            for r, p in enumerate(self.procs, 1):
                code = p.poll()
                if code not in (None, 0, 1, 2):
                    if not self._claim():  # the main thread saw it first and reports it
                        return
                    self._kill()
                    import shutil
                    for d in list(ABORT_CLEANUP):
                        shutil.rmtree(d, ignore_errors=True)
                    how = f"signal {-code}" if code < 0 else f"exit {code}"
                    self.on_failure(f"worker rank {r} died ({how}); stopped the others")
                    os._exit(2)

    def _kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)

    def __exit__(self, exc_type, *exc):
        self._stop.set()
        if exc_type is not None:  # rank 0 failed: the workers would wait for it until the timeout
            self._kill()
        shutdown()
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        for k in ENV_KEYS + ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(k, None)
        return False
