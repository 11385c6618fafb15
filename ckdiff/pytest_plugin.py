"""pytest plugin, registered through the ``pytest11`` entry point when ckdiff is installed.

Fixtures:
  ckdiff_golden(model, layout, dtype="float32", **kw) -> Path   tiny golden checkpoint (cached per session)
  ckdiff_work -> Path                                           a scratch directory
Marker:
  @pytest.mark.ckdiff  tags converter gates (every ``ckdiff.testing.gate`` test; select with ``-m ckdiff``)
Option:
  --ckdiff-reports DIR  an HTML and a JSON report per gate run; each names the pytest command that
                        reproduces that test (never pytest's own command line)
Helpers live in ``ckdiff.testing``: gate, assert_checkpoints_match, assert_logits_match, tiny_configs.
"""
from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.getgroup("ckdiff").addoption(
        "--ckdiff-reports", metavar="DIR", default=None, dest="ckdiff_reports",
        help="write an HTML and a JSON report of every ckdiff gate run into DIR")


def pytest_configure(config):
    config.addinivalue_line("markers", "ckdiff: a ckdiff converter gate (round trip, golden diff, logits)")


@pytest.fixture(scope="session")
def ckdiff_golden(tmp_path_factory):
    from ckdiff.golden.emit import emit
    cache: dict = {}

    def make(model: str = "llama-gqa", layout: str = "hf", dtype: str = "float32", **kw):
        key = (model, layout, dtype, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("ckdiff-golden") / "-".join([model, layout, dtype])
            cache[key] = emit(out, model, layout, dtype, **kw)
        return cache[key]
    return make


@pytest.fixture
def ckdiff_work(tmp_path):
    return tmp_path
