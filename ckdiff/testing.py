"""Public helpers for gating converters in any project's test suite.

    from ckdiff.testing import Converter, gate
    def run(src, out, options): my_tool.convert(src, out)          # writes `out`
    MINE = Converter("my-hf-to-megatron", "hf", "megatron", run, inverse="megatron-to-hf",
                     golden="emit", models=("llama-gqa", "mistral-gqa"))
    test_my_converter = gate(MINE)    # round trip, golden diff and logits, per tiny model

The pytest plugin (entry point ``pytest11``) adds the fixtures ``ckdiff_golden`` and
``ckdiff_work`` and the ``ckdiff`` marker; the helpers here raise ``AssertionError``
with the mismatch table as the message.
"""
from __future__ import annotations

from pathlib import Path

from .compare.diff import Options, compare_checkpoints
from .converters.formats import open_checkpoint
from .golden.suite import REGISTRY, CheckResult, Converter, check_converter, register, validate

__all__ = ["Converter", "gate", "assert_checkpoints_match", "assert_logits_match", "tiny_configs", "register",
           "REGISTRY", "check_converter"]


def _table(res, limit=30) -> str:
    rows = [t for t in res.worst_first() if not t.ok][:limit]
    lines = [f"checkpoints differ: {res.counts()}", f"  A: {res.a}", f"  B: {res.b}",
             f"  {'status':<8} {'tensor':<60} {'max abs':>10}  index / diagnosis"]
    for t in rows:
        where = t.max_abs_index if t.max_abs_index is not None else (t.shape_a, t.shape_b)
        lines.append(f"  {t.status:<8} {t.name:<60} {t.max_abs:>10.3g}  {where} {'; '.join(t.diagnosis)}")
    return "\n".join(lines)


def assert_checkpoints_match(a, b, **options) -> None:
    """Every tensor equal (bit-exact when no cast happened); options as ``compare.diff.Options``."""
    res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)), Options(**options))
    if not res.equivalent:
        raise AssertionError(_table(res))


def assert_logits_match(a, b, **kw) -> None:
    """Forward passes of both checkpoints in their own layouts agree (see compare.logits)."""
    from .compare.logits import compare_logits
    r = compare_logits(open_checkpoint(str(a)), open_checkpoint(str(b)), **kw)
    if not r.equivalent:
        raise AssertionError(f"logits differ: max per-token KL {r.max_kl:.4g} > {r.threshold:.3g} at "
                             f"[seq, pos] {r.max_kl_at}; top-1 agreement {r.top1_agreement:.3f}; "
                             f"first divergent layer {r.first_divergent_layer}")


def _fail(checks: list[CheckResult]) -> str:
    return "\n".join(f"{c.converter} on {c.model}: {c.check} failed: {c.detail}" for c in checks if not c.ok)


def gate(converter: Converter, models=None, dtypes=("float32",), logits: bool = True):
    """A pytest test function (parametrized per model and dtype) that runs the whole gate."""
    import pytest
    if converter.name not in REGISTRY:
        register(converter)
    problems = validate(converter)
    params = [(m, d) for m in (models or converter.models) for d in dtypes]

    @pytest.mark.parametrize("model,dtype", params)
    def test_gate(model, dtype, tmp_path):
        if problems:
            pytest.fail("; ".join(problems))
        checks = check_converter(converter.name, model, Path(tmp_path), dtype, logits=logits, converter=converter)
        assert all(c.ok for c in checks), _fail(checks)
    test_gate.__name__ = f"test_gate_{converter.name.replace('-', '_')}"
    return test_gate


def tiny_configs(families=("llama",)):
    """hypothesis strategy of tiny ModelConfigs with 1 < K < H, H/K != K, even head dims."""
    from hypothesis import strategies as st

    from .converters.config import ModelConfig

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
