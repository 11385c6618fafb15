"""The HTML report of a failing Llama-shaped comparison (32 layers, HF names, one bad tensor late in the
grid, a mapping with long target names) at 900 and 1400 px in headless Chromium: the failing heatmap
cell is in view of its scrolled grid and named above it, the failing row's diagnosis is in view beside
its name, and nothing widens the page. Screenshots are saved and checked for content."""
import pytest

from ckdiff.compare.diff import CompareResult, TensorResult
from ckdiff.reports.html import COLUMNS, render_html
from helpers import box, browser

KINDS = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
         "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
         "mlp.down_proj.weight"]
BAD = "model.layers.29.mlp.down_proj.weight"
DIAG = ("transposed: B == A.T (the converter wrote the row-major layout where the column-major one belongs, "
        "as a GGUF export of down_proj does)")


def failing_llama() -> CompareResult:
    ts = []
    for i in range(32):
        for k in KINDS:
            name = f"model.layers.{i}.{k}"
            bad = name == BAD
            ts.append(TensorResult(name, "differ" if bad else "equal", [4096, 14336], [4096, 14336], "bfloat16",
                                   "bfloat16", not bad, 4096 * 14336, 0.7 if bad else 0.0, [5, 9] if bad else None,
                                   n_over_tol=4096 * 14336 // 2 if bad else 0, diagnosis=[DIAG] if bad else []))
    mapping = [[[f"model.layers.{{i}}.{k}"],
                [f"language_model.encoder.layers.{{i}}.{k.replace('self_attn', 'self_attention')}_with_a_long_suffix"],
                "PermuteRope(heads=32, kv_heads=8, head_dim=128) then Stack(dim=0)"] for k in KINDS]
    return CompareResult("/ckpt/llama-3-8b-hf", "/ckpt/llama-3-8b-back", "hf", "hf", ts, mapping=mapping)


def _inside(inner, outer, slack=1.0) -> bool:
    return (inner[0] >= outer[0] - slack and inner[1] >= outer[1] - slack and inner[2] <= outer[2] + slack
            and inner[3] <= outer[3] + slack)


@pytest.mark.parametrize("width", [900, 1400])
def test_failing_rows_and_their_diagnosis_are_in_view(tmp_path, width):
    from selenium.webdriver.common.by import By
    (tmp_path / "r.html").write_text(render_html("compare", failing_llama(), "ckdiff a b"))
    d = browser()
    try:
        d.set_window_size(width, 1000)
        d.get((tmp_path / "r.html").as_uri())
        view = [0, 0, d.execute_script("return document.documentElement.clientWidth"), 1e9]
        # the grid scrolled to its failing cell, which is named above it
        cell = d.find_element(By.CSS_SELECTOR, ".heat td.h4")
        grid = cell.find_element(By.XPATH, "ancestor::div[contains(@class,'scroll')]")
        assert _inside(box(d, cell), box(d, grid)), (box(d, cell), box(d, grid))
        assert _inside(box(d, cell), view)
        assert "layer 29 mlp.down_proj" in d.find_element(By.ID, "heat-failing").text
        # the failing row first, its diagnosis in view in the table's scroll box (not past its right edge)
        row = d.find_element(By.CSS_SELECTOR, "#tensors tbody tr")
        tds = row.find_elements(By.TAG_NAME, "td")
        assert tds[0].text == BAD and tds[1].text == "differ"
        diag = tds[COLUMNS.index("diagnosis")]
        table_box = box(d, d.find_element(By.ID, "tensors").find_element(By.XPATH, ".."))
        assert diag.text.startswith("transposed: B == A.T") and _inside(box(d, diag), table_box)
        assert diag.get_attribute("title") == DIAG  # the whole text on hover
        # nothing (the mapping table included) makes the page wider than the window
        assert d.execute_script("return document.documentElement.scrollWidth") <= view[2]
        mapping = d.find_element(By.CSS_SELECTOR, "table.map")
        assert box(d, mapping)[2] <= view[2]
        shot = tmp_path / f"failing-{width}.png"
        d.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        d.quit()
