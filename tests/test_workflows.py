"""The roundtrip/golden/demo workflows as a user meets them: a failure names its reason in every output,
the converters' own options are taken and shown, sides are labelled by what they are, narrow terminals
never split words, every long flag is accepted in both spellings, ``logits --format`` offers only what it
runs, and the pytest helpers' assertion reads as words.

Checkpoints: tiny random HF directories from ckdiff's own writer (golden/models.py), converted by
ckdiff's converters; these tests are about what the commands show, not about a format."""
import json
import re
import shutil

import pytest
from rich.console import Console

from ckdiff.commands import COMMANDS


@pytest.fixture(scope="module")
def rope_changed(tiny_hf, tmp_path_factory):
    """(A, A with a different rope_theta): same tensors, a function-changing config difference."""
    a = tiny_hf("llama-gqa")
    d = tmp_path_factory.mktemp("wf") / "rope"
    shutil.copytree(a, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_theta"] = 1234.0
    (d / "config.json").write_text(json.dumps(cfg))
    return a, d


def test_golden_failure_names_its_reason_everywhere(rope_changed, tmp_path, run_cli):
    a, d = rope_changed
    code, out, err = run_cli("golden", "hf-to-megatron", a, d, "--markdown", tmp_path / "r.md", "--html",
                             tmp_path / "r.html", "--junit", tmp_path / "r.xml", "--make_vocab_size_divisible_by",
                             "8", "--no-github-summary")
    assert code == 1, err
    reason = "config rope_theta: A=10000.0 B=1234.0"
    assert reason in out and "15 equal" in out
    assert reason in (tmp_path / "r.md").read_text()
    html = (tmp_path / "r.html").read_text()
    assert "Why it differs" in html and "rope_theta: A=10000.0 B=1234.0" in html
    assert "rope_theta" in (tmp_path / "r.xml").read_text()
    # sides named by what they are, not by the removed temporary directories; the options shown
    assert f"A: golden: {a} via hf-to-megatron" in out and f"B: candidate: {d} via hf-to-megatron" in out
    assert "/tmp/ckdiff-golden-" not in out + html
    assert "converter: hf-to-megatron pad=8" in out


def test_suite_detail_carries_every_reason(rope_changed):
    from ckdiff.golden.suite import _compare, _summary
    a, d = rope_changed
    s = _summary(_compare(a, d))
    assert s.startswith("21 tensors: 21 equal") and "config rope_theta: A=10000.0 B=1234.0" in s


def test_roundtrip_takes_the_converters_options(tiny_hf, tmp_path, run_cli):
    src = tiny_hf("llama-gqa")
    code, out, err = run_cli("roundtrip", "to-jetstream", src, "--quantize_type", "int8_per_channel", "--no-logits",
                             "--json", tmp_path / "r.json", "--no-github-summary")
    assert code == 0, err
    check = json.loads((tmp_path / "r.json").read_text())["result"]["checks"][0]
    assert check["variant"] == "quantize=int8_per_channel" and "quant" in check["detail"]
    assert "quantize=int8_per_channel" in out
    assert check["result"]["b"] == f"{src} via to-jetstream"
    code, _, err = run_cli("roundtrip", "hf-to-megatron", src, "--quantize-type", "int8_per_channel")
    assert code == 2 and "applies to to-jetstream, not hf-to-megatron" in err
    code, _, err = run_cli("roundtrip", "to-jetstream", src, "--quantize-type", "int3")
    assert code == 2 and "int8_per_channel" in err


def _parsers():
    for name, mod in COMMANDS.items():
        p = mod.parser(f"ckdiff {name}")
        yield p
        for a in p._actions:
            if a.__class__.__name__ == "_SubParsersAction":
                yield from a.choices.values()


def test_every_long_flag_in_both_spellings():
    checked = 0
    for p in _parsers():
        for act in p._actions:
            for opt in act.option_strings:
                body = opt[2:]
                if not opt.startswith("--") or not re.search(r"[-_]", body):
                    continue
                for other in ("--" + body.replace("_", "-"), "--" + body.replace("-", "_")):
                    assert p._option_string_actions[p._spelled(other)] is act, (p.prog, opt, other)
                    checked += 1
    assert checked > 50
    # and as parsed: megatron-to-hf declares --true_vocab_size, hf-to-megatron --true-vocab-size
    conv = COMMANDS["convert"].parser()
    a = conv.parse_args(["megatron-to-hf", "--input-dir", "i", "--output-dir", "o", "--true-vocab-size", "5"])
    b = conv.parse_args(["hf-to-megatron", "llama2", "--out", "o", "--true_vocab_size", "5"])
    assert a.true_vocab_size == b.true_vocab_size == 5


def test_logits_offers_only_formats_it_runs():
    from ckdiff.formats import registry
    p = COMMANDS["logits"].parser()
    fmt = next(a for a in p._actions if a.dest == "format")
    runnable = {f.name for f in registry.formats() if f.runtime is not registry.Runtime.NONE}
    assert set(fmt.choices) == runnable and "tensors" not in fmt.choices and "file" not in fmt.choices


@pytest.mark.parametrize("width", [60, 80, 160])
def test_suite_table_never_splits_words(width):
    from ckdiff.golden.suite import CheckResult, SuiteResult
    from ckdiff.reports.terminal import print_suite
    details = ["21 tensors: 21 equal",
               "KL from reference quantization 1.2e-05 (quantization alone 3.4e-3) (threshold 1e-4), top-1 1.000",
               "model.layers.0.self_attn.k_proj.weight: differ (k permuted with the query head count)"]
    checks = [CheckResult("to-jetstream", "llama-blockwise", "logits", i != 2, d, variant="quantize=int4_blockwise")
              for i, d in enumerate(details)]
    con = Console(width=width, record=True, file=open("/dev/null", "w"))
    print_suite(SuiteResult(checks), con)
    text = con.export_text()
    words = re.findall(r"[\w.=()\-:,+]+", text)
    for d in details:
        for w in d.split():
            assert w in words, (w, text)


def test_assertion_counts_read_as_words(tiny_hf):
    from ckdiff.testing import assert_checkpoints_match
    with pytest.raises(AssertionError) as e:
        assert_checkpoints_match(tiny_hf("llama-gqa"), tiny_hf("llama-gqa", seed=1))
    first = str(e.value).splitlines()[0]
    assert first == "checkpoints differ: 14 differ, 7 equal" or re.fullmatch(r"checkpoints differ: (\d+ [a-z-]+(, )?)+",
                                                                            first), first
    assert "Status." not in str(e.value) and "{" not in first
