"""The README stays short and true: its set-up commands are the ones CI runs, and every block marked
``<!-- runnable -->`` runs (in one bash session, ``ckdiff`` being ``python -m ckdiff``) with the exit
codes it states (``# exits N`` at the end of a command; 0 otherwise)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_is_short():
    assert len(README.splitlines()) <= 200


def test_setup_commands_are_the_ones_ci_runs():
    assert "pip install torch==2.13.0 && pip install -e . && ckdiff demo" in README
    assert "\nbash .ci/run\n" in README
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python3 -m pip install -q torch==2.13.0" in ci and 'python3 -m pip install -q -e ".[test]"' in ci
    assert re.search(r"^python3 -m pytest -q$", ci, re.M)  # exactly the test command the README names


def runnable_blocks(text: str) -> list[str]:
    return re.findall(r"<!-- runnable -->\n```bash\n(.*?)```", text, re.S)


def commands(block: str) -> list[tuple[str, int]]:
    """(command, expected exit code) per logical line: continuations joined, comment lines left out."""
    out, cur = [], ""
    for line in block.splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        m = re.search(r"\s+#\s*exits (\d+)\s*$", cur)
        out.append((cur[:m.start()] if m else cur, int(m.group(1)) if m else 0))
        cur = ""
    return out


def test_runnable_blocks_parse():
    blocks = runnable_blocks(README)
    assert len(blocks) >= 2
    cmds = [c for b in blocks for c in commands(b)]
    assert any(code == 1 for _, code in cmds)  # the broken pair is shown failing
    assert commands("a \\\n  b  # exits 1\n# note\nc\n") == [("a    b", 1), ("c", 0)]


def test_readme_commands_run(tmp_path):
    script = [f'ckdiff() {{ "{sys.executable}" -m ckdiff "$@"; }}']
    for cmd, code in (c for b in runnable_blocks(README) for c in commands(b)):
        if re.fullmatch(r"[A-Z_]+=\S+", cmd):  # a variable for the commands after it
            script.append(cmd)
            continue
        quoted = cmd.replace("'", "'\\''")
        script.append(f"{cmd} > out.txt 2>&1; rc=$?; if [ $rc -ne {code} ]; then "
                      f"echo 'README command exited '$rc', not {code}: {quoted}'; cat out.txt; exit 1; fi")
    r = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
                                         "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "120"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "report.xml").is_file() and (tmp_path / "megatron-tp2").is_dir()
