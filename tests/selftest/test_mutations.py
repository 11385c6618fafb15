"""The mutation self-test (tests/selftest/catalogue.py), one test per mutation: every bug injected into a
converter, a checkpoint or an encoding is caught and its cause named (typed finding kinds where the
catalogue gives them); every correct conversion and equivalent rewrite passes and says why.

Fixtures: the tiny models are written by ckdiff's own writers (golden/emit.py) and converters; GGUF files by
the gguf package's writer and quantizer, then their block bytes edited the way a broken writer leaves them;
FP8 files by DeepSeek-V3's ``weight_quant`` rule (formats/fp8.py ``fp8_quantize``: no tool on CPU writes
that layout); MXFP4 experts by the OCP quantizer of test_encoding_mxfp4.py (no CPU tool writes GPT-OSS's layout);
MLX files by mlx-lm itself. The misread float sides of those encodings are written by the catalogue (the bug
planted by the test)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from selftest.catalogue import (
    CATALOGUE,
    STATE_CATALOGUE,
    baseline_key,
    run_baseline,
    run_mutations,
    run_state_mutations,
)


@pytest.fixture(scope="module")
def work():
    # a short path: error messages quoted in the checks' details are cut at 200 characters
    d = Path(tempfile.mkdtemp(prefix="ckm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_catalogue_covers_the_bug_classes():
    assert len(CATALOGUE) >= 23 and len({m.bug_class for m in CATALOGUE}) >= 14
    assert len(STATE_CATALOGUE) >= 38
    assert all(m.names for m in CATALOGUE)
    kinds = {k for m in STATE_CATALOGUE for k in m.kinds}
    assert {"scale-zeroed", "scale-multiplied", "nibbles-swapped", "scale-reciprocal", "scale-transposed",
            "scale-stale", "codes-of-another-encoding", "block-size-wrong", "zero-point-underflow", "code-offset-wrong",
            "offset-sign-wrong", "nibbles-interleaved", "scale-of-another-encoding"} <= kinds


@pytest.mark.parametrize("key", list(dict.fromkeys(baseline_key(m) for m in CATALOGUE)), ids=lambda k: "-".join(
    [k[0], k[1], k[2]] + [f"{a}{b}" for a, b in k[3]]))
def test_unmutated_converter_passes(work, key):
    checks = run_baseline(work / "c", key)
    assert checks and all(c.ok for c in checks), [(c.converter, c.model, c.check, c.detail) for c in checks if not c.ok]


@pytest.mark.parametrize("i", range(len(CATALOGUE)), ids=[m.name for m in CATALOGUE])
def test_converter_mutation_is_caught_and_named(work, i):
    m = CATALOGUE[i]
    (o,), _ = run_mutations(work / f"c{i:02d}", [m], baseline=False)
    assert o.caught, o.details
    assert o.named, (m.names, o.details)


@pytest.mark.parametrize("i", range(len(STATE_CATALOGUE)), ids=[m.name for m in STATE_CATALOGUE])
def test_checkpoint_mutation(work, i):
    m = STATE_CATALOGUE[i]
    (o,) = run_state_mutations(work / "s", [m], first=i)
    if m.negative:  # a correct conversion or an equivalent rewrite: passes, and its report says why
        assert not o.caught, o.details
        assert o.named, (m.names, o.details)
        return
    assert o.caught, o.details
    assert set(m.kinds) <= set(o.kinds), (m.kinds, o.kinds, o.details)
    assert o.named, (m.names, o.details)
