"""Results CI systems read natively: JUnit XML (parsed by junitparser and checked against the rules of the
JUnit schema CI systems read), the GitHub job summary, the composite action's shell steps run as GitHub
would run them (no network: the installs are dry runs against what is installed), the verification
record in the JSON result, and ``ckdiff replay`` on an unchanged and a changed checkpoint.

The checkpoints are tiny random HF directories written by ckdiff's own writer (golden/models.py): these
tests are about the outputs, not about reading a format."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from junitparser import Failure, JUnitXml

ROOT = Path(__file__).resolve().parents[1]

# The JUnit schema most CI systems read: jenkinsci/xunit-plugin
# src/main/resources/org/jenkinsci/plugins/xunit/types/model/xsd/junit-10.xsd (commit 0c37522): per element,
# the attributes it may carry, the required ones and the children it may hold
SCHEMA = {
    "testsuites": ({"name", "time", "tests", "failures", "disabled", "errors"}, set(), {"testsuite"}),
    "testsuite": ({"name", "tests", "failures", "errors", "time", "disabled", "skipped", "skips", "timestamp",
                   "hostname", "id", "package", "assertions", "file", "skip", "log", "url"}, {"tests"},
                  {"testsuite", "properties", "testcase", "system-out", "system-err"}),
    "properties": (set(), set(), {"property"}),
    "property": ({"name", "value"}, {"name", "value"}, set()),
    "testcase": ({"name", "assertions", "time", "timestamp", "classname", "status", "class", "file", "line", "log",
                  "group", "url"}, {"name"},
                 {"skipped", "error", "failure", "rerunFailure", "rerunError", "system-out", "system-err"}),
    "failure": ({"message", "type"}, set(), set()),
}


def check_schema(path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    for el in root.iter():
        allowed, required, children = SCHEMA[el.tag]
        assert set(el.attrib) <= allowed, (el.tag, set(el.attrib) - allowed)
        assert required <= set(el.attrib), (el.tag, required - set(el.attrib))
        assert {c.tag for c in el} <= children, (el.tag, {c.tag for c in el} - children)
        for k in ("tests", "failures", "errors", "skipped"):
            if k in el.attrib:
                assert int(el.attrib[k]) >= 0
    for suite in root.iter("testsuite"):
        cases = suite.findall("testcase")
        assert int(suite.get("tests")) == len(cases)
        assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in cases)
    return root


@pytest.fixture(scope="module")
def pair(tiny_hf, tmp_path_factory):
    """(A, a copy of A, C = A with every tensor changed), and a model with one config value changed."""
    a = tiny_hf("llama-gqa", seed=0)
    work = tmp_path_factory.mktemp("ci")
    same = work / "same"
    shutil.copytree(a, same)
    return a, same, tiny_hf("llama-gqa", seed=1)


def _cases(path):
    xml = JUnitXml.fromfile(str(path))
    return [(case.classname, case.name, [r for r in case.result if isinstance(r, Failure)])
            for suite in xml for case in suite]


def test_junit_of_an_equivalent_pair(pair, tmp_path, run_cli):
    a, same, _ = pair
    code, _, err = run_cli(a, same, "--junit", tmp_path / "j.xml", "-q", "--no-github-summary")
    assert code == 0, err
    check_schema(tmp_path / "j.xml")
    cases = _cases(tmp_path / "j.xml")
    names = [n for _, n, _ in cases]
    # one case per tensor group (layers folded), then the config and coverage checks
    assert "tensors model.layers.{0..1}.self_attn.q_proj.weight" in names
    assert names[-2:] == ["config", "coverage"]
    assert not any(f for _, _, f in cases)


def test_junit_failures_carry_their_message(pair, tmp_path, run_cli):
    a, _, other = pair
    code, _, _ = run_cli(a, other, "--junit", tmp_path / "j.xml", "-q", "--no-github-summary")
    assert code == 1
    check_schema(tmp_path / "j.xml")
    xml = JUnitXml.fromfile(str(tmp_path / "j.xml"))
    assert xml.failures > 0 and xml.tests >= xml.failures
    failed = {n: f[0] for _, n, f in _cases(tmp_path / "j.xml") if f}
    q = failed["tensors model.layers.{0..1}.self_attn.q_proj.weight"]
    assert q.message.startswith("model.layers.") and "differ" in q.message and "+1 more" in q.message
    assert q.text.count("\n") == 1  # both layers listed in the failure's text


def test_junit_escapes_control_characters(tmp_path):
    from ckdiff.reports.junit import render_junit
    row = {"name": "x\x1b[31m.weight\x00", "status": "differ", "max_abs": 1.0, "diagnosis": ["a\x07b"]}
    doc = render_junit("compare", {"a": "A\x01", "b": "B", "tensors": [row]}, "differ", "ckdiff A\x01 B")
    (tmp_path / "j.xml").write_text(doc)
    root = check_schema(tmp_path / "j.xml")
    assert "\\x1b" in root.find(".//testcase").get("name")


def test_junit_of_a_suite_has_one_case_per_check(tiny_hf, tmp_path, run_cli):
    src = tiny_hf("llama-gqa", seed=0)
    code, out, err = run_cli("roundtrip", "hf-to-megatron", src, "--no-logits", "--junit", tmp_path / "j.xml",
                             "-q", "--no-github-summary")
    assert code == 0, err
    check_schema(tmp_path / "j.xml")
    assert [n.split()[-1] for _, n, _ in _cases(tmp_path / "j.xml")] == ["roundtrip"]


def test_job_summary_is_appended_when_github_step_summary_is_set(pair, tmp_path, run_cli, monkeypatch):
    a, same, other = pair
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert run_cli(a, same, "-q")[0] == 0
    assert run_cli(a, other, "-q")[0] == 1
    text = summary.read_text()
    assert text.startswith("earlier step\n")  # appended, never replaced
    assert "ckdiff compare: **equivalent**" in text and "ckdiff compare: **differ**" in text
    assert "q_proj.weight" in text
    assert run_cli(a, same, "-q", "--no-github-summary")[0] == 0
    assert summary.read_text() == text
    # --github-summary PATH without the variable; --github-summary alone needs it
    monkeypatch.delenv("GITHUB_STEP_SUMMARY")
    own = tmp_path / "own.md"
    assert run_cli(a, same, "-q", "--github-summary", own)[0] == 0 and "equivalent" in own.read_text()
    code, _, err = run_cli(a, same, "-q", "--github-summary")
    assert code == 2 and "GITHUB_STEP_SUMMARY is not set" in err


def test_the_json_result_is_a_verification_record(pair, tmp_path, run_cli):
    a, same, _ = pair
    code, _, err = run_cli(a, same, "--json", tmp_path / "r.json", "--hash", "--atol", "0.5", "-q",
                           "--no-github-summary")
    assert code == 0, err
    p = json.loads((tmp_path / "r.json").read_text())["provenance"]
    import numba
    import numpy
    import torch

    from ckdiff import __version__
    assert p["versions"]["ckdiff"] == __version__ and p["versions"]["torch"] == torch.__version__
    assert p["versions"]["numpy"] == numpy.__version__ and p["versions"]["numba"] == numba.__version__
    if p["source"] is not None:  # run from a git checkout of ckdiff
        assert re.fullmatch(r"[0-9a-f]{40}", p["source"]["commit"])
    assert p["argv"][:2] == [str(a), str(same)] and "--atol" in p["command"]
    assert p["settings"]["options"]["atol"] == 0.5
    files = {Path(f["path"]).name: f for i in p["inputs"] for f in i["files"]}
    st = a / "model.safetensors"
    raw = st.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert files["model.safetensors"]["size"] == len(raw)
    assert files["model.safetensors"]["header_sha256"] == hashlib.sha256(raw[:8 + n]).hexdigest()
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert "config.json" in files


def test_replay_unchanged_and_changed(pair, tmp_path, run_cli):
    a, same, other = pair
    b = tmp_path / "b"
    shutil.copytree(same, b)
    rec = tmp_path / "r.json"
    html = tmp_path / "r.html"
    assert run_cli(a, b, "--json", rec, "--html", html, "--hash", "-q", "--no-github-summary")[0] == 0
    html.unlink()
    code, out, err = run_cli("replay", rec)
    assert code == 0 and "UNCHANGED" in out, err
    assert not html.exists()  # the recorded command's reports are not written again
    shutil.copy(other / "model.safetensors", b / "model.safetensors")
    code, out, err = run_cli("replay", rec)
    assert code == 1, err
    assert "CHANGED" in out and "verdict: equivalent -> differ" in out and "equal -> differ" in out
    # same layout, other values: only the full content hash (--hash, kept by the replay) tells
    assert re.search(r"input .*/b/model.safetensors: content hash changed", out), out
    new = tmp_path / "new.json"
    assert run_cli("replay", rec, "--json", new, "-q")[0] == 1
    assert json.loads(new.read_text())["verdict"] == "differ"


@pytest.mark.parametrize("doc, why", [
    ("{", "not a JSON result"),
    ('{"schema": "ckdiff.result/1", "verdict": "equivalent", "result": {}, "provenance": {"argv": [1]}}',
     "list of strings"),
    ('{"schema": "ckdiff.result/1", "verdict": "equivalent", "result": {}, '
     '"provenance": {"argv": ["convert", "to-jetstream"]}}', "only commands that read their inputs"),
    ('{"schema": "ckdiff.result/1", "verdict": "equivalent", "result": {}, '
     '"provenance": {"argv": ["a", "b", "--trust-pickle"]}}', "--trust-pickle"),
])
def test_replay_refuses_what_it_must_not_run(tmp_path, run_cli, doc, why):
    (tmp_path / "r.json").write_text(doc)
    code, out, err = run_cli("replay", tmp_path / "r.json")
    assert code == 2 and why in err and len(err.strip().splitlines()) == 1


def test_replay_drops_report_flags_however_spelled():
    from ckdiff.commands.replay import replay_argv
    name, argv = replay_argv(["A", "B", "--htm", "x.html", "--json=r.json", "--github-summary", "--atol", "1",
                              "-q"], False)
    assert (name, argv) == ("compare", ["A", "B", "--atol", "1"])
    assert replay_argv(["golden", "to-jetstream", "g", "c", "--work", "w"], False) == \
        ("golden", ["to-jetstream", "g", "c"])


# ---------------------------------------------------------------- the composite action
def _expand(value: str, inputs: dict, outputs: dict) -> str:
    def sub(m):
        expr = m.group(1).strip()
        if expr.startswith("inputs."):
            return inputs[expr[len("inputs."):]]
        step, _, key = expr[len("steps."):].partition(".outputs.")
        return outputs[step][key]
    return re.sub(r"\$\{\{(.*?)\}\}", sub, str(value))


def run_action(inputs: dict, cwd: Path, action_path: Path) -> tuple[list, dict, Path]:
    """Run the action's shell steps as GitHub does (bash -e -o pipefail, GITHUB_OUTPUT per step, the
    step's env with its expressions expanded); ``uses:`` steps are left to GitHub."""
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    defaults = {k: str(v.get("default", "")) for k, v in action["inputs"].items()}
    inputs = {**defaults, **inputs}
    summary = cwd / "step-summary.md"
    outputs, codes = {}, []
    for i, step in enumerate(action["runs"]["steps"]):
        if "run" not in step:
            continue
        assert step["shell"] == "bash" and "${{" not in step["run"]  # inputs reach scripts only as env
        out_file = cwd / f"output-{i}"
        out_file.write_text("")
        script = cwd / f"step-{i}.sh"
        script.write_text(step["run"])
        env = {**os.environ, "GITHUB_ACTION_PATH": str(action_path), "GITHUB_OUTPUT": str(out_file),
               "GITHUB_STEP_SUMMARY": str(summary), "PYTHONPATH": str(ROOT),
               **{k: _expand(v, inputs, outputs) for k, v in (step.get("env") or {}).items()}}
        r = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=300)
        codes.append((step["name"], r.returncode, r.stdout + r.stderr))
        if "id" in step:
            outputs[step["id"]] = dict(line.split("=", 1) for line in out_file.read_text().splitlines() if line)
        if r.returncode != 0:
            break
    return codes, outputs, summary


@pytest.fixture(scope="module")
def action_checkout(tmp_path_factory):
    """The files pip needs to install ckdiff from the action's checkout, copied (pip builds in place)."""
    co = tmp_path_factory.mktemp("action")
    for f in ("pyproject.toml", "README.md", "action.yml"):
        shutil.copy(ROOT / f, co / f)
    shutil.copytree(ROOT / "ckdiff", co / "ckdiff", ignore=shutil.ignore_patterns("__pycache__"))
    return co


def test_action_installs_compares_and_reports(pair, tmp_path, action_checkout):
    a, same, other = pair
    pip = "--dry-run --no-index --no-deps --no-build-isolation"  # resolved offline against what is installed
    codes, outputs, summary = run_action({"args": f"'{a}' '{same}'", "pip-args": pip}, tmp_path, action_checkout)
    assert [c for _, c, _ in codes] == [0, 0, 0], codes
    assert "Would install ckdiff" in codes[0][2] and "torch" in codes[0][2]
    assert outputs["compare"] == {"exit-code": "0", "verdict": "equivalent"}
    reports = tmp_path / "ckdiff-reports"
    assert sorted(p.name for p in reports.iterdir()) == ["junit.xml", "report.html", "report.md", "result.json"]
    check_schema(reports / "junit.xml")
    assert "ckdiff compare: **equivalent**" in summary.read_text()

    codes, outputs, _ = run_action({"args": f"'{a}' '{other}'", "install": "false", "reports-dir": "r2"},
                                   tmp_path, action_checkout)
    assert [c for _, c, _ in codes] == [0, 0, 1] and outputs["compare"]["verdict"] == "differ"
    assert "::error::ckdiff found a difference" in codes[-1][2]
    codes, outputs, _ = run_action({"args": f"'{a}' '{tmp_path / 'missing'}'", "install": "false",
                                    "reports-dir": "r4", "fail-on-differ": "false"}, tmp_path, action_checkout)
    assert [c for _, c, _ in codes] == [0, 0, 2] and outputs["compare"] == {"exit-code": "2", "verdict": "error"}
