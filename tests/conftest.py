import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# under GitHub Actions every step has it: the commands the tests run would append to this job's summary
os.environ.pop("GITHUB_STEP_SUMMARY", None)

from ckdiff.golden.models import hf_state, lazy, tiny_config, write_tiny_hf  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """tiny_hf(name, dtype="float32", shards=1, seed=0) -> path of a generated HF checkpoint (cached)."""
    cache = {}

    def make(name="llama-gqa", dtype="float32", shards=1, seed=0):
        key = (name, dtype, shards, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp("hf") / f"{name}-{dtype}-{shards}-{seed}"
            write_tiny_hf(out, name, dtype, seed, num_shards=shards)
            cache[key] = out
        return cache[key]
    return make


@pytest.fixture
def run_cli(capsys):
    """run_cli(*args) -> (exit code, stdout, stderr) of the ckdiff CLI in-process."""
    from ckdiff.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


__all__ = ["hf_state", "lazy", "tiny_config"]
