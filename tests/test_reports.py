"""Reports: JSON schema, Markdown for PRs, self-contained HTML tested in a real browser."""
import json
import re

import pytest

from ckdiff.compare.diff import CompareResult, TensorResult
from ckdiff.reports.html import COLUMNS, render_html, render_markdown
from helpers import box as _box
from helpers import browser as _driver


def big_result(n_layers=80, equal=True):
    kinds = ["attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
             "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight", "attention_norm.weight",
             "ffn_norm.weight"]
    ts = []
    for i in range(n_layers):
        for k in kinds:
            bad = not equal and i == 17 and k == "attention.wk.weight"
            ts.append(TensorResult(f"layers.{i}.{k}", "differ" if bad else "equal", [1024, 8192], [1024, 8192],
                                   "bfloat16", "bfloat16", True, 1024 * 8192, 0.7 if bad else 0.0,
                                   [5, 9] if bad else None, diagnosis=["rotary permutation: B == P(A)"] if bad else []))
    ts.append(TensorResult("output.weight", "only-a", [32000, 8192], None, "bfloat16", None))
    return CompareResult("/ckpt/a", "/ckpt/b", "meta", "jetstream", ts)


def test_json_report_schema(tiny_hf, tmp_path, run_cli):
    run_cli(tiny_hf(), tiny_hf(seed=1), "--json", tmp_path / "r.json", "--html", tmp_path / "r.html",
            "--markdown", tmp_path / "r.md")
    d = json.loads((tmp_path / "r.json").read_text())
    assert set(d) == {"schema", "kind", "ckdiff_version", "torch_version", "command", "verdict", "result", "provenance"}
    assert d["schema"] == "ckdiff.result/1" and d["kind"] == "compare" and d["verdict"] == "differ"
    t = d["result"]["tensors"][0]
    for k in ("name", "status", "shape_a", "dtype_a", "bit_exact", "max_abs", "max_abs_index", "mean_abs", "max_rel",
              "cosine", "n_over_tol", "nan_a", "inf_b", "atol", "rtol", "tol_source", "diagnosis"):
        assert k in t
    md = (tmp_path / "r.md").read_text()
    assert md.splitlines()[0].startswith("## :x: ckdiff compare: **differ**")
    assert "<details>" in md and "model.embed_tokens.weight" in md
    html = (tmp_path / "r.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script src" not in html


def test_html_stays_small_for_70b_scale():
    html = render_html("compare", big_result(80, equal=False))
    assert len(html) < 400_000, len(html)  # 721 tensors; ~0.5 kB each at most
    assert "layer 17" in html and "DIFFER" in html
    md = render_markdown("compare", big_result(80, equal=True))
    assert len(md) < 5_000  # all-equal: the summary has nothing to unfold


def _cast_result(bad: bool):
    """A bf16 cast of 4 layers (big max-abs, within tolerance), optionally with one tensor over tolerance."""
    ts = []
    for i in range(4):
        for k in ("attention.wq.weight", "attention.wk.weight"):
            wrong = bad and i == 2 and k == "attention.wk.weight"
            ts.append(TensorResult(f"layers.{i}.{k}", "differ" if wrong else "cast", [64, 64], [64, 64], "float32",
                                   "bfloat16", False, 4096, 3.0 if wrong else 0.06, [1, 2], n_over_tol=900 if wrong else 0,
                                   atol=1e-5, rtol=1.6e-2))
    ts.append(TensorResult("layers.0.ffn_norm.weight", "quant", [64], [64], "float32", "int8", False, 64, 0.02, [3]))
    return CompareResult("/a", "/b", "hf", "hf", ts)


def test_passing_report_has_no_red_and_a_legend():
    from ckdiff.reports.html import heatmap
    ok = render_html("compare", _cast_result(False), "ckdiff /a /b")
    assert not re.search(r"class=h[345]", ok) and "banner bad" not in ok
    assert ok.count("<td class=h1") == 9 and "within tolerance" in ok  # cast and quant cells: passing colour
    assert "Reproduce: <code>ckdiff /a /b</code>" in ok
    bad = render_html("compare", _cast_result(True))
    assert bad.count("<td class=h4") == 1 and "Reproduce:" not in bad  # no command given, none invented
    _, _, cells = heatmap(_cast_result(True).to_dict()["tensors"])
    assert cells[(2, "attention.wk.weight")][0] > 2 > cells[(2, "attention.wq.weight")][0] > 0


def test_markdown_and_html_sort_worst_first():
    ts = [TensorResult("a.small", "differ", [4], [4], "float32", "float32", False, 4, 0.1, [0], n_over_tol=1),
          TensorResult("b.missing", "only-a", [4], None, "float32", None),
          TensorResult("c.big", "differ", [4], [4], "float32", "float32", False, 4, 9.0, [1], n_over_tol=4)]
    res = CompareResult("/a", "/b", "hf", "hf", ts)
    md = render_markdown("compare", res)
    assert md.index("<code>b.missing</code>") < md.index("<code>c.big</code>") < md.index("<code>a.small</code>")
    assert [t.name for t in res.worst_first()] == ["b.missing", "c.big", "a.small"]
    html = render_html("compare", res)
    data = json.loads(html.split("<script id=data type=application/json>")[1].split("</script>")[0])
    assert [r[0] for r in data["rows"]] == ["b.missing", "c.big", "a.small"]


def test_logits_report_reads_as_a_report(tiny_hf):
    from ckdiff.compare.logits import compare_logits
    from ckdiff.formats.readers import open_checkpoint
    a, b = open_checkpoint(str(tiny_hf())), open_checkpoint(str(tiny_hf(seed=1)))
    res = compare_logits(a, b, batch=2, length=6)
    html = render_html("logits", res, "ckdiff logits A B")
    assert "gate_kl" not in html and "None" not in html
    assert "is over its limit" in html and "standard profile" in html and "Noise floor and signals" in html
    assert html.count("<rect") >= 2 * 6 + len(res.layer_rel_errors)  # KL picture + per-layer bars
    assert "Per-token KL (sequence x position)" in html and "Hidden-state divergence per layer" in html
    s, p = res.max_kl_at
    assert f"Top-5 at the worst token (sequence {s}, position {p})" in html
    assert len(res.token_kl) == 2 and len(res.token_kl[0]) == 6 and max(map(max, res.token_kl)) == pytest.approx(
        res.max_kl, rel=1e-3)
    same = render_html("logits", compare_logits(a, a, batch=2, length=6))
    assert "is within its limit" in same and "banner ok" in same




@pytest.mark.parametrize("width", [900, 1400])
def test_html_layout_at_two_widths(tmp_path, width):
    from selenium.webdriver.common.by import By
    res = big_result(20, equal=False)
    bug = next(t for t in res.tensors if t.status == "differ")
    bug.n_over_tol = bug.numel // 2  # half the elements over tolerance: the darkest "over" colour
    for t in res.tensors[:30]:  # long diagnoses, as real reports have
        t.diagnosis = ["rotary permutation with the wrong head count: B == A re-permuted as 32 heads x 128 rows "
                       "where A is 8 heads x 512 (the query head count was used where the KV head count belongs)"]
    (tmp_path / "r.html").write_text(render_html("compare", res, "ckdiff /ckpt/a /ckpt/b"))
    d = _driver()
    try:
        d.set_window_size(width, 1000)
        d.get((tmp_path / "r.html").as_uri())
        line = float(d.execute_script("return parseFloat(getComputedStyle(document.body).lineHeight)"))
        rows = d.find_elements(By.CSS_SELECTOR, "#tensors tbody tr")[:40]
        heights = [_box(d, r)[3] - _box(d, r)[1] for r in rows]
        assert max(heights) < 2.2 * line, heights  # one line per row, long diagnoses included
        for r in rows[:10]:  # shapes never wrap onto two lines
            cell = r.find_elements(By.TAG_NAME, "td")[COLUMNS.index("shape A")]
            assert _box(d, cell)[3] - _box(d, cell)[1] < 2.2 * line
        # heatmap numbers stay legible: light text on the dark cell
        cell = d.find_element(By.CSS_SELECTOR, ".heat td.h4")
        assert d.execute_script("return getComputedStyle(arguments[0]).color", cell) == "rgb(255, 255, 255)"
        assert float(d.execute_script("return parseFloat(getComputedStyle(arguments[0]).fontSize)", cell)) >= 12
        # block elements do not overlap one another
        blocks = [e for e in d.find_elements(By.CSS_SELECTOR, "body > *") if e.tag_name not in ("script", "style")]
        boxes = [_box(d, e) for e in blocks if e.is_displayed()]
        for (a, b) in zip(boxes, boxes[1:]):
            assert b[1] >= a[3] - 0.5, (a, b)
        d.save_screenshot(str(tmp_path / f"report-{width}.png"))
        assert (tmp_path / f"report-{width}.png").stat().st_size > 10_000
    finally:
        d.quit()


def test_html_in_headless_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    res = big_result(20, equal=False)
    (tmp_path / "r.html").write_text(render_html("compare", res))
    d = _driver()
    try:
        d.get((tmp_path / "r.html").as_uri())
        assert d.find_element(By.ID, "verdict").text.startswith("DIFFER")
        rows = lambda: d.find_elements(By.CSS_SELECTOR, "#tensors tbody tr")  # noqa: E731
        assert len(rows()) == len(res.tensors)
        # worst first by default
        assert rows()[0].find_elements(By.TAG_NAME, "td")[1].text == "only-a"
        # sort by name (ascending) by clicking the header
        d.find_elements(By.CSS_SELECTOR, "#tensors th")[0].click()
        names = [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows()]
        assert names == sorted(names)
        # numeric columns sort descending on the first click, ascending on the second
        col = COLUMNS.index("max abs")
        hdr = d.find_elements(By.CSS_SELECTOR, "#tensors th")[col]
        hdr.click()
        first = rows()[0].find_elements(By.TAG_NAME, "td")
        assert (first[0].text, first[col].text) == ("layers.17.attention.wk.weight", "0.7")
        hdr.click()
        assert rows()[0].find_elements(By.TAG_NAME, "td")[col].text == "0"
        # filter by name
        d.find_element(By.ID, "q").send_keys("layers.3.")
        assert len(rows()) == 9 and all("layers.3." in r.text for r in rows())
        d.execute_script("const q=document.getElementById('q'); q.value=''; q.dispatchEvent(new Event('input'));")
        assert len(rows()) == len(res.tensors)
        # filter by status
        Select(d.find_element(By.ID, "st")).select_by_visible_text("differ")
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows()] == ["layers.17.attention.wk.weight"]
        assert "1 of" in d.find_element(By.ID, "count").text
        d.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10_000
    finally:
        d.quit()
