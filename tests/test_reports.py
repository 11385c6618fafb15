"""Reports: JSON schema, Markdown for PRs, self-contained HTML tested in a real browser."""
import json
import os
import shutil

import pytest

from ckdiff.compare.diff import CompareResult, TensorResult
from ckdiff.reports.html import render_html, render_markdown


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
    assert set(d) == {"schema", "kind", "ckdiff_version", "torch_version", "command", "verdict", "result"}
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


def _driver():
    selenium = pytest.importorskip("selenium")  # noqa: F841
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("chromium / chromedriver not installed (.ci/run installs them)")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager reach the network
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    o = webdriver.ChromeOptions()
    o.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1400,1000"):
        o.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=o)


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
        hdr = d.find_elements(By.CSS_SELECTOR, "#tensors th")[6]
        hdr.click()
        first = rows()[0].find_elements(By.TAG_NAME, "td")
        assert (first[0].text, first[6].text) == ("layers.17.attention.wk.weight", "0.7")
        hdr.click()
        assert rows()[0].find_elements(By.TAG_NAME, "td")[6].text == "0"
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
