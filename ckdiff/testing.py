"""Public helpers for gating converters in any project's test suite.

    from ckdiff.testing import Converter, gate
    def run(src, out, options): my_tool.convert(src, out)          # writes `out`
    MINE = Converter("my-hf-to-megatron", "hf", "megatron", run, inverse="megatron-to-hf",
                     golden="emit", models=("llama-gqa", "mistral-gqa"))
    test_my_converter = gate(MINE)    # round trip, golden diff and logits, per tiny model

The pytest plugin (entry point ``pytest11``) adds the fixtures ``ckdiff_golden`` and
``ckdiff_work``, the ``ckdiff`` marker (every ``gate`` test carries it: select with ``-m ckdiff``)
and ``--ckdiff-reports DIR`` (an HTML and a JSON report per gate run); the helpers here raise
``AssertionError`` with the mismatch table as the message. ``gate`` leaves the converter registry
as it is: the converter under test is resolved beside it, not registered into it.
"""
from __future__ import annotations

import shlex
from collections import ChainMap
from pathlib import Path

from ckdiff.compare.diff import Options, compare_checkpoints
from ckdiff.formats.readers import open_checkpoint
from ckdiff.golden.suite import (
    REGISTRY,
    CheckResult,
    Converter,
    SuiteResult,
    check_converter,
    register,
    validate,
)

__all__ = ["Converter", "gate", "assert_checkpoints_match", "assert_logits_match", "tiny_configs", "register",
           "REGISTRY", "check_converter", "write_gate_report", "pytest_command"]


def _table(res, limit=30) -> str:
    rows = [t for t in res.worst_first() if not t.ok][:limit]
    lines = [f"checkpoints differ: {res.counts_text()}", f"  A: {res.a}", f"  B: {res.b}",
             *(f"  {r}" for r in res.reasons()),
             f"  {'status':<8} {'tensor':<60} {'max abs':>10}  index / diagnosis"]
    for t in rows:
        where = t.max_abs_index if t.max_abs_index is not None else tuple(None if s is None else list(s) for s in (t.shape_a, t.shape_b))
        lines.append(f"  {t.status:<8} {t.name:<60} {t.max_abs:>10.3g}  {where} {'; '.join(t.diagnosis)}")
    return "\n".join(lines)


def assert_checkpoints_match(a, b, **options) -> None:
    """Every tensor equal (bit-exact when no cast happened); options as ``compare.diff.Options``."""
    res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)), Options(**options))
    if not res.equivalent:
        raise AssertionError(_table(res))


def assert_logits_match(a, b, **kw) -> None:
    """Forward passes of both checkpoints in their own layouts agree (see compare.logits)."""
    from ckdiff.compare.logits import compare_logits
    r = compare_logits(open_checkpoint(str(a)), open_checkpoint(str(b)), **kw)
    if not r.equivalent:
        raise AssertionError(f"logits differ: {r.summary()}; max KL at [seq, pos] {r.max_kl_at}; "
                             f"first divergent layer {r.first_divergent_layer}")


def _fail(checks: list[CheckResult]) -> str:
    return "\n".join(f"{c.converter} on {c.model}: {c.check} failed: {c.detail}" for c in checks if c.ok is False)


def pytest_command(node) -> str:
    """The command that reproduces one pytest test: ``python -m pytest '<file>::<test>[<params>]'``."""
    where = str(node.path) + node.nodeid[node.nodeid.index("::"):] if "::" in node.nodeid else str(node.path)
    return "python -m pytest " + shlex.quote(where)


def write_gate_report(checks: list[CheckResult], out: Path, command: str) -> list[Path]:
    """``out``.html and ``out``.json for one gate run; ``command`` is the reproduce line they show."""
    from ckdiff.io.writers import atomic_file
    from ckdiff.reports.html import render_html
    from ckdiff.reports.render import render_json
    res = SuiteResult(list(checks))
    out = Path(out)
    written = []
    for path, text in ((out.with_name(out.name + ".html"), render_html("demo", res, command)),
                       (out.with_name(out.name + ".json"), render_json("demo", res.to_dict(), res.verdict(), command))):
        atomic_file(path, lambda tmp, text=text: Path(tmp).write_text(text))  # appears only by atomic rename
        written.append(path)
    return written


def _report_name(nodeid: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in nodeid)[-150:]


def gate(converter: Converter, models=None, dtypes=("float32",), logits: bool = True, registry=None):
    """A pytest test function (parametrized per model and dtype, marked ``ckdiff``) that runs the whole gate.

    The inverse is looked up in ``registry`` (default: ckdiff's registry) with ``converter`` beside
    it; nothing is registered. With ``--ckdiff-reports DIR`` each run writes DIR/<test id>.html/.json,
    whose "Reproduce" line is this test's own pytest command."""
    import pytest
    reg = ChainMap({converter.name: converter}, registry if registry is not None else REGISTRY)
    problems = validate(converter, reg)
    params = [(m, d) for m in (models or converter.models) for d in dtypes]

    @pytest.mark.ckdiff
    @pytest.mark.parametrize("model,dtype", params)
    def test_gate(model, dtype, tmp_path, request):
        if problems:
            pytest.fail("; ".join(problems))
        checks = check_converter(converter.name, model, Path(tmp_path), dtype, logits=logits, converter=converter,
                                 registry=reg)
        reports = request.config.getoption("ckdiff_reports", None)
        if reports:
            write_gate_report(checks, Path(reports) / _report_name(request.node.nodeid), pytest_command(request.node))
        assert all(c.ok is not False for c in checks), _fail(checks)
    test_gate.__name__ = f"test_gate_{converter.name.replace('-', '_')}"
    return test_gate


def tiny_configs(families=("llama",)):
    """hypothesis strategy of tiny ModelConfigs with 1 < K < H, H/K != K, even head dims."""
    from hypothesis import strategies as st

    from ckdiff.models.config import ModelConfig

    @st.composite
    def build(draw):
        K = draw(st.integers(2, 4))
        r = draw(st.sampled_from([x for x in (2, 3, 4) if x != K]))
        hd = draw(st.sampled_from([4, 8, 12]))
        H = K * r
        D = draw(st.sampled_from([H * hd, H * hd + 8, 32]))
        return ModelConfig(draw(st.sampled_from(list(families))), hidden=D, layers=draw(st.integers(1, 3)),
                           heads=H, kv_heads=K, head_dim=hd, ffn=draw(st.sampled_from([16, 24, 40])),
                           vocab=draw(st.integers(17, 131)), rope_theta=draw(st.sampled_from([1e4, 5e5])))
    return build()
