"""ckdiff.testing / the pytest plugin: gate() keeps the registry as it is, carries the ``ckdiff`` marker,
and reports written from pytest name the test's own command, not pytest's command line."""
import json

from ckdiff.golden.suite import REGISTRY, Converter
from ckdiff.testing import gate

pytest_plugins = ["pytester"]


def _noop(src, out, options):
    raise AssertionError("not run in these tests")


def test_gate_does_not_register_the_converter():
    before = dict(REGISTRY)
    c = Converter("gold-unregistered", "hf", "jetstream", _noop, inverse="jetstream-to-hf", golden="emit")
    gate(c)
    assert dict(REGISTRY) == before and "gold-unregistered" not in REGISTRY


def test_gate_sees_its_inverse_in_the_registry_it_is_given():
    back = Converter("gold-back", "jetstream", "hf", _noop, inverse="gold-there", golden="emit")
    there = Converter("gold-there", "hf", "jetstream", _noop, inverse="gold-back", golden="emit")
    fn = gate(there, registry={"gold-back": back})
    assert "gold-back" not in REGISTRY and "gold-there" not in REGISTRY
    assert fn.__name__ == "test_gate_gold_there"
    # no inverse outside the given registry: the gate test fails with the registry's problem
    lonely = Converter("gold-lonely", "hf", "jetstream", _noop, inverse="gold-back", golden="emit")
    from ckdiff.golden.suite import validate
    from collections import ChainMap
    assert validate(lonely, ChainMap({"gold-lonely": lonely}, REGISTRY)) == ["gold-lonely: no registered inverse"]


def test_gate_carries_the_ckdiff_marker():
    c = Converter("gold-marked", "hf", "jetstream", _noop, inverse="jetstream-to-hf", golden="emit")
    marks = {m.name for m in getattr(gate(c), "pytestmark", [])}
    assert {"ckdiff", "parametrize"} <= marks


GATE_FILE = """
from ckdiff.convert.api import to_jetstream
from ckdiff.testing import Converter, gate

def run(src, out, options):
    to_jetstream("llama-2", src, out, overwrite=True)

MINE = Converter("plugin-hf-to-jetstream", "hf", "jetstream", run, inverse="jetstream-to-hf", golden="emit",
                 models=("llama-gqa",))
test_mine = gate(MINE, logits=False)

def test_other():
    pass
"""


def test_plugin_reports_name_the_tests_own_command(pytester, tmp_path):
    pytester.makepyfile(test_gatefile=GATE_FILE)
    reports = tmp_path / "reports"
    r = pytester.runpytest_inprocess("-m", "ckdiff", "-q", "-p", "no:cacheprovider", "--ckdiff-reports", str(reports))
    r.assert_outcomes(passed=1, deselected=1)  # -m ckdiff selects the gate only
    (html,) = reports.glob("*.html")
    (doc,) = [json.loads(p.read_text()) for p in reports.glob("*.json")]
    test_file = pytester.path / "test_gatefile.py"
    want = f"python -m pytest '{test_file}::test_mine[llama-gqa-float32]'"
    assert doc["command"] == want and doc["verdict"] == "pass"
    assert f"Reproduce: <code>{want.replace(chr(39), '&#x27;')}</code>" in html.read_text()
    assert "--ckdiff-reports" not in html.read_text()  # not pytest's own command line
    assert [c["check"] for c in doc["result"]["checks"]] == ["roundtrip", "golden"]
    assert all(c["command"].startswith("ckdiff ") for c in doc["result"]["checks"])
