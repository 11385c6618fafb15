"""The HTML report renders through jinja2 templates with autoescape on: names, paths, commands, config
values and findings that carry HTML or JavaScript appear in the page only escaped, in every section a
result can fill (tensors, heatmap, config, warnings, diagnosis, checks, mapping, the data block)."""
import json
import re
from importlib import resources

import pytest
from markupsafe import Markup

from ckdiff.compare.diff import CompareResult, TensorResult
from ckdiff.golden.suite import CheckResult, SuiteResult
from ckdiff.reports import html as H
from ckdiff.text import html_text, printable

PAYLOADS = ["<script>alert(1)</script>", "<img src=x onerror=alert(2)>", "'><svg onload=alert(3)>",
            "\"><b onmouseover=alert(4)>", "</script><script>alert(5)//", "<!--", "x\x1b[2J\u202e"]
# none may appear as markup; no control character or direction mark may appear raw
LIVE = ("<script>alert", "<img", "<svg", "<b ", "<!--", "onerror=alert(2)>", "\x1b", "\u202e")


def _names(p: str) -> list:
    """Tensor names carrying ``p`` in a layer (heatmap), as only-a/only-b and as a plain row."""
    return [f"layers.0.{p}.weight", f"layers.1.{p}.weight", f"only_a.{p}", f"only_b.{p}"]


def _compare(p: str) -> CompareResult:
    a, b, oa, ob = _names(p)
    ts = [TensorResult(a, "differ", [4, 4], [4, 4], "float32", "float32", False, 16, 0.5, [1, 2], n_over_tol=3,
                       diagnosis=[f"finding {p}"]),
          TensorResult(b, "equal", [4, 4], [4, 4], "float32", "float32", False, 16, 0.0),
          TensorResult(oa, "only-a", [4], None, "float32", None), TensorResult(ob, "only-b", None, [4], None, "float32")]
    return CompareResult(f"/ckpt/{p}/a", f"/ckpt/{p}/b", "hf", "hf", ts, config_diff=[(p, p, [p])],
                         notes=[f"note {p}"], warnings=[f"warning {p}"], mapping=[([a], [b], f"op {p}")])


def _suite(p: str) -> SuiteResult:
    return SuiteResult([CheckResult(f"conv {p}", f"model {p}", "roundtrip", False, f"detail {p}", variant=p,
                                    command=f"ckdiff {p}")], [([f"src {p}"], [f"dst {p}"], f"op {p}")])


def _markup(page: str) -> str:
    """The page without its data block and its own script: what the browser parses as HTML."""
    page = re.sub(r"<script id=data type=application/json>.*?</script>", "", page, flags=re.S)
    return page.replace(f"<script>{H.JS}</script>", "")


def test_the_environment_escapes():
    env = H.environment()
    assert env.autoescape is True  # every template, whatever its name
    for p in PAYLOADS:
        out = env.from_string("<p>{{ x }}</p><p title='{{ x }}'>{{ [x, x]|join(', ') }}</p>").render(x=p)
        assert p not in out and html_text(p) in out, out


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payloads_appear_only_escaped(payload):
    for kind, res in (("compare", _compare(payload)), ("demo", _suite(payload))):
        page = H.render_html(kind, res, f"ckdiff {payload}")
        shown = _markup(page)
        assert payload not in shown, kind
        for live in LIVE:
            assert live not in shown, (kind, live)
        assert html_text(payload) in shown, kind  # shown, as text
        assert shown.count("<script") == 0 and page.count("<script") == 1 + (kind == "compare")
    # the data block holds the names as shown (printable: controls as visible escapes), as JSON text with no
    # character that could end the block
    page = H.render_html("compare", _compare(payload))
    block = page.split("<script id=data type=application/json>")[1].split("</script>")[0]
    assert "<" not in block and ">" not in block
    rows = json.loads(block)["rows"]
    assert {printable(n) for n in _names(payload)} <= {r[0] for r in rows}


def test_the_page_is_markup_where_it_should_be():
    """Autoescape off would escape the macros' output (the header's <wbr>) and the page's sections: the
    page would show its own tags as text."""
    page = H.render_html("compare", _compare(PAYLOADS[0]))
    assert "<wbr>" in page and "&lt;wbr&gt;" not in page
    assert "id=verdict>DIFFER" in page and "<table class=heat>" in page and "<td class=h4" in page


def test_template_syntax_in_a_name_is_text():
    p = "{{ 7*7 }}{% raw %}{# c #}"
    page = H.render_html("compare", _compare(p), f"ckdiff {p}")
    assert f"<code>only_a.{p}</code>" in page and "only_a.49" not in page


def test_only_static_css_and_js_are_markup():
    assert isinstance(H.CSS, Markup) and isinstance(H.JS, Markup)
    src = resources.files("ckdiff.reports")
    templates = [f for f in (src / "templates").iterdir() if f.name.endswith(".html.j2")]
    assert {f.name for f in templates} >= {"report.html.j2", "compare.html.j2", "logits.html.j2", "checks.html.j2"}
    for f in templates:
        text = f.read_text()
        assert "|safe" not in text.replace(" ", "") and "autoescape false" not in text, f.name
    code = (src / "html.py").read_text()
    # Markup is built in three places only: the CSS, the JS and the environment's escape (html_text's output)
    assert re.findall(r"Markup\(", code) == ["Markup("] * 3, re.findall(r".*Markup\(.*", code)
    assert "Markup(html_text(value))" in code
