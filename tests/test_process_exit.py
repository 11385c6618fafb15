"""The ``ckdiff`` process ends by ``os._exit`` once its command has returned (ckdiff/cli.py ``run``): what it
printed and wrote is complete, its exit code is the command's, and a reader that goes away early still
gets the quiet exit of a pipe. Each case runs ``python -m ckdiff`` (the console script's own function) in a
fresh process on a generated tiny Llama (GQA) checkpoint."""
import io
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ckdiff(*argv, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ckdiff", *map(str, argv)], capture_output=True, env=env,
                          timeout=300, **kw)


def test_the_console_script_is_the_fast_exit():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ckdiff"] == "ckdiff.cli:run"


def test_standard_output_is_complete_before_the_process_ends(tiny_hf):
    # a JSON report larger than the stream's buffer, to a pipe (block-buffered): every byte arrives
    a, b = tiny_hf(), tiny_hf(seed=1)
    r = _ckdiff(a, b, "--json", "-", "--no-github-summary")
    assert r.returncode == 1, r.stderr
    assert len(r.stdout) > io.DEFAULT_BUFFER_SIZE
    doc = json.loads(r.stdout)
    assert doc["verdict"] == "differ" and all(t["status"] == "differ" for t in doc["result"]["tensors"])
    r = _ckdiff(a, a, "--no-github-summary")
    assert r.returncode == 0 and r.stdout.decode().startswith("EQUIVALENT") and r.stderr == b""


def test_reports_are_complete_and_errors_keep_their_code(tiny_hf, tmp_path):
    a, b = tiny_hf(), tiny_hf(seed=1)
    r = _ckdiff(a, b, "-q", "--html", tmp_path / "r.html", "--junit", tmp_path / "r.xml", "--no-github-summary")
    assert r.returncode == 1, r.stderr
    assert (tmp_path / "r.html").read_text().rstrip().endswith("</html>")
    assert (tmp_path / "r.xml").read_text().rstrip().endswith("</testsuites>")
    r = _ckdiff(a, tmp_path / "missing")
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1 and b"Traceback" not in r.stderr


def test_a_reader_that_leaves_early_gets_the_pipe_exit(tiny_hf):
    a, b = tiny_hf(), tiny_hf(seed=1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "ckdiff", str(a), str(b), "--json", "-", "--no-github-summary"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.read(10)
    p.stdout.close()  # the reader goes away with most of the report unread
    err = p.stderr.read()
    assert p.wait(timeout=300) == 141 and b"Traceback" not in err and b"Exception ignored" not in err


def test_openmp_threads_sleep_when_idle_unless_the_caller_says_otherwise():
    # the console script sets OMP_WAIT_POLICY before torch (and its libgomp, which reads it once) is loaded
    probe = ("import os, sys; import ckdiff.cli as c\n"
             "c.main = lambda: sys.stdout.write(os.environ.get('OMP_WAIT_POLICY', '-') + ' '\n"
             "                                  + str('torch' in sys.modules)) and 0\n"
             "c.run()")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, env=env, timeout=120)
    assert (r.returncode, r.stdout) == (0, b"PASSIVE False"), r.stderr
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                       timeout=120)
    assert (r.returncode, r.stdout) == (0, b"ACTIVE False"), r.stderr
