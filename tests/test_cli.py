"""The command line as a new user meets it: help, shared flags, config-less directories, the terminal table
at fixed widths, symmetry of A and B, orientation messages, and the one report-writing path."""
import ast
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from ckdiff.commands import COMMANDS
from ckdiff.compare.diff import CompareResult, Options, TensorResult, compare_checkpoints
from ckdiff.formats.readers import open_checkpoint
from ckdiff.io.safetensors import read_safetensors, write_safetensors
from ckdiff.golden.models import lazy
from ckdiff.reports.terminal import print_compare

ROOT = Path(__file__).resolve().parents[1] / "ckdiff"


# ---------------------------------------------------------------- one command layer
def _library_modules():
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT)
        if rel.parts[0] == "commands" or rel.name in ("cli.py", "__main__.py") and len(rel.parts) == 1:
            continue
        yield rel, ast.parse(f.read_text())


def test_library_never_parses_arguments_prints_or_imports_the_commands():
    bad = []
    for rel, tree in _library_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                bad.append(f"{rel}: print()")
            if isinstance(node, ast.Attribute) and node.attr in ("ArgumentParser", "argv"):
                bad.append(f"{rel}: {node.attr}")
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                names = [a.name for a in node.names]
                if "commands" in mod.split(".") or mod.endswith("cli") and rel.name != "cli.py" \
                        or (mod in ("..", ".") and ("commands" in names or "cli" in names)):
                    bad.append(f"{rel}: imports {mod} {names}")
    assert not bad, bad


def _parsers():
    """Every parser of every command, the converters' included."""
    for name, mod in COMMANDS.items():
        p = mod.parser(f"ckdiff {name}")
        yield f"ckdiff {name}", p
        for a in p._actions:
            if a.__class__.__name__ == "_SubParsersAction":
                for sub, sp in a.choices.items():
                    yield f"ckdiff {name} {sub}", sp


def test_every_argument_has_help_and_lists_its_choices():
    missing = []
    for prog, p in _parsers():
        text = p.format_help()
        for a in p._actions:
            if a.help is None or not a.help.strip():
                missing.append(f"{prog} {a.dest}: no help")
            for c in a.choices or []:
                if a.__class__.__name__ != "_SubParsersAction" and str(c) not in text:
                    missing.append(f"{prog} {a.dest}: choice {c} not listed")
    assert not missing, missing


@pytest.mark.parametrize("argv", [["convert", "--help"], ["convert", "-h"], ["help", "convert"]])
def test_convert_help_lists_the_converters_one_line_each(run_cli, argv):
    code, out, err = run_cli(*argv)
    assert code == 0 and not err
    for name in ("hf-to-megatron", "megatron-to-hf", "to-jetstream", "jetstream-to-hf"):
        line = next(x for x in out.splitlines() if x.strip().startswith(name))
        assert len(line.split()) > 3, line  # the name and its one-line description on the same line


def test_help_command_and_help_flags(run_cli):
    code, out, _ = run_cli("help")
    assert code == 0 and all(n in out for n in COMMANDS)
    for name in COMMANDS:
        code, out, err = run_cli(name, "--help")
        assert code == 0 and out.startswith(f"usage: ckdiff {name}"), (name, err)
        assert run_cli("help", name)[1].rstrip() == out.rstrip()
    code, out, _ = run_cli("help", "convert", "to-jetstream")
    assert code == 0 and "--quantize_type" in out and "int4_blockwise" in out
    code, _, err = run_cli("help", "nosuch")
    assert code == 2 and "unknown command" in err and err.count("\n") == 1
    code, out, _ = run_cli("-h")
    assert code == 0 and "commands:" in out and "usage: ckdiff [compare]" in out


def test_python_m_ckdiff(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "ckdiff", "--version"], capture_output=True, text=True,
                       cwd=ROOT.parent)
    assert r.returncode == 0 and r.stdout.startswith("ckdiff ")


def test_quiet_is_shared(tiny_hf, tmp_path, run_cli):
    a, b = tiny_hf(), tiny_hf(seed=1)
    for argv in (["logits", a, a, "--length", 8, "--batch", 1], [a, b], ["inspect", a]):
        code, out, _ = run_cli(*argv, "-q")
        assert code in (0, 1) and len(out.strip().splitlines()) == 1, (argv, out)
    code, out, _ = run_cli("logits", a, b, "--length", 8, "--batch", 1, "-q")
    assert code == 1 and out.startswith("DIFFER: ") and "noise floor" in out
    code, out, _ = run_cli("convert", "to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir", a,
                           "--output_checkpoint_dir", tmp_path / "js", "-q")
    assert code == 0 and out == ""


# ---------------------------------------------------------------- item 1: directories without config.json
def _plain(src: Path, out: Path, kind: str) -> Path:
    out.mkdir(parents=True)
    tensors = {k: t.load() for k, t in read_safetensors(src / "model.safetensors").items()}
    if kind == "single":
        shutil.copy(src / "model.safetensors", out / "model.safetensors")
    elif kind == "bin":
        torch.save(tensors, out / "weights.bin")
    else:  # shards + index, names a plain exporter would choose
        names = sorted(tensors)
        half = {n: ("part-1.safetensors" if i % 2 else "part-0.safetensors") for i, n in enumerate(names)}
        for f in set(half.values()):
            write_safetensors(out / f, lazy({n: tensors[n] for n in names if half[n] == f}).values())
        (out / "weights.safetensors.index.json").write_text(json.dumps({"weight_map": half}))
    return out


@pytest.mark.parametrize("kind", ["single", "sharded", "bin"])
def test_directory_without_config_is_a_plain_set_of_tensors(tiny_hf, tmp_path, run_cli, kind):
    src = tiny_hf()
    a = _plain(src, tmp_path / "a", "single")
    b = _plain(src, tmp_path / "b", kind)
    code, out, err = run_cli(a, b)
    assert code == 0, out + err
    assert "[tensors]" in out
    code, out, _ = run_cli("inspect", b)
    assert code == 0 and "[tensors]" in out and "model.layers.{0..1}.self_attn.q_proj.weight" in out
    # against the HF directory it came from: compared by name, and says why no layout mapping happened
    code, out, _ = run_cli(src, b)
    assert code == 0 and "plain set of tensors" in out
    other = _plain(tiny_hf(seed=1), tmp_path / "c", kind)
    code, out, _ = run_cli(a, other)
    assert code == 1 and "differ" in out


def test_features_that_need_a_config_say_so(tiny_hf, tmp_path, run_cli):
    a = _plain(tiny_hf(), tmp_path / "a", "single")
    code, _, err = run_cli("logits", a, tiny_hf())
    assert code == 2 and err.count("\n") == 1
    assert "plain set of tensors" in err and "config" in err and str(a) in err


# ---------------------------------------------------------------- items 3, 4: the terminal table
LONG = "model.language_model.encoder.layers.{i}.self_attention.query_key_value.weight"


def _result(n=6, cast=0):
    ts = []
    for i in range(n):
        ts.append(TensorResult(LONG.format(i=i), "differ", [4096, 4096], [4096, 4096], "bfloat16", "bfloat16", False,
                               4096 * 4096, 0.5 + i, [i, 4095], 0.01, 1.0, 0.98, 1000 + i,
                               diagnosis=["rotary permutation with the wrong head count: B == A re-permuted as 32 "
                                          "heads x 128 rows where A is 8 heads x 512 (the query head count was "
                                          "used where the KV head count belongs)"] if i == 2 else []))
    for i in range(cast):
        ts.append(TensorResult(f"model.layers.{i}.mlp.up_proj.weight", "cast", [8, 8], [8, 8], "float32",
                               "bfloat16", False, 64))
    ts.append(TensorResult("lm_head.weight", "cast", [8, 8], [8, 8], "float32", "float16", False, 64))
    ts.append(TensorResult("model.norm.weight", "equal", [8], [8], "float32", "float32", True, 8))
    return CompareResult("/ckpt/a", "/ckpt/b", "megatron", "megatron", ts)


def _render(res, width) -> str:
    buf = io.StringIO()
    print_compare(res, Console(file=buf, width=width, force_terminal=False, color_system=None), 40)
    return buf.getvalue()


@pytest.mark.parametrize("width", [80, 120])
def test_terminal_table_never_breaks_names(width):
    res = _result()
    out = _render(res, width)
    lines = out.splitlines()
    for t in res.tensors:
        if not t.ok:
            rows = [x for x in lines if t.name in x]
            assert len(rows) == 1 and rows[0].split()[0] == "differ", (t.name, out)
    # nothing but whole names runs past the width
    for x in lines:
        assert len(x) <= width or any(t.name in x for t in res.tensors) or x.startswith(("A: ", "B: ")), x
    # the diagnosis goes on its own indented line(s) under its row
    i = next(k for k, x in enumerate(lines) if LONG.format(i=2) in x)
    d = next(k for k in range(i + 1, i + 4) if lines[k].lstrip().startswith("-> rotary permutation"))
    assert lines[d].startswith("        ") and LONG.format(i=3) not in " ".join(lines[i + 1:d + 1])
    assert "query head count" in " ".join(lines[d:d + 4])
    # the layout adapts: the wide console shows columns the narrow one leaves out
    head = next(x for x in lines if x.startswith("status"))
    if width == 120:
        assert "max abs @ index" in head and "shape A / B" in head
    else:  # no room beside the name: the facts go on an indented line under the row
        assert head.split() == ["status", "tensor"]
        row = next(k for k, x in enumerate(lines) if LONG.format(i=5) in x)
        assert lines[row + 1].split()[:4] == ["max", "abs", "5.5", "@"] and "[4096, 4096]" in lines[row + 1]


def test_casts_are_named_and_collapsed():
    out = _render(_result(n=1, cast=32), 120)
    line = next(x for x in out.splitlines() if x.startswith("cast:"))
    assert "model.layers.{0..31}.mlp.up_proj.weight (float32 -> bfloat16)" in line
    assert "lm_head.weight (float32 -> float16)" in line


# ---------------------------------------------------------------- item 10: A and B swapped
def _layouts(tmp: Path, tag: str) -> dict:
    from ckdiff.io.writers import atomic_dir, write_meta_shards
    from ckdiff.golden import emit as E
    cfg = E.tiny_config("llama-gqa")
    out = {lay: E.emit(tmp / f"{lay}-{tag}", "llama-gqa", lay) for lay in ("hf", "jetstream", "megatron")}
    meta = tmp / f"meta-rope-{tag}"
    with atomic_dir(meta, overwrite=True) as t:  # a Meta release with its rope.freqs buffer
        write_meta_shards(t, lazy(E.meta_state(cfg, E.hf_state(cfg, 0))), cfg.to_meta(), 2, rope_freqs=True)
    out["meta"] = meta
    out["tensors"] = _plain(out["hf"], tmp / f"tensors-{tag}", "single")
    return out


def test_swapping_a_and_b_never_changes_the_verdict(tmp_path, monkeypatch):
    from ckdiff.golden import emit as E
    same = _layouts(tmp_path, "same")
    orig = E.hf_state

    def one_element_off(cfg, seed=0):  # the same model with one element of one k projection changed
        s = orig(cfg, seed)
        s["model.layers.1.self_attn.k_proj.weight"][3, 5] += 0.25
        return s
    monkeypatch.setattr(E, "hf_state", one_element_off)
    other = _layouts(tmp_path, "other")
    assert "rope.freqs" in open_checkpoint(str(same["meta"])).tensors
    verdicts = {}
    for x in same:
        for y in same:
            for label, b_side in (("same", same), ("other", other)):
                pa, pb = open_checkpoint(str(same[x])), open_checkpoint(str(b_side[y]))
                ab = compare_checkpoints(pa, pb, Options(diagnose=False))  # the verdict never needs the diagnosis
                ba = compare_checkpoints(pb, pa, Options(diagnose=False))
                assert ab.verdict() == ba.verdict(), (x, y, label, ab.counts(), ba.counts())
                verdicts[(x, y, label)] = ab.verdict()
    for (x, y, label), v in verdicts.items():
        if label == "other":
            assert v == "differ", (x, y)
        elif "tensors" not in (x, y) or {x, y} <= {"tensors", "hf"}:
            assert v == "equivalent", (x, y)  # every model layout pair maps; the buffers never count


# ---------------------------------------------------------------- item 9: orientation
def test_megatron_subdirectory_suggests_the_root(tmp_path, run_cli, ckdiff_golden):
    meg = ckdiff_golden("llama-gqa", "megatron")
    code, _, err = run_cli(ckdiff_golden("llama-gqa", "hf"), meg / "release")
    assert code == 2 and f"pass that directory instead" in err and str(meg) in err


def test_hf_to_megatron_default_source_is_explained(tmp_path, run_cli):
    code, _, err = run_cli("convert", "hf-to-megatron", "llama2", "--size", "7", "--out", tmp_path / "o",
                           "--cache-dir", tmp_path / "cache")
    assert code == 2 and err.count("\n") == 1
    assert "no --model-path given" in err and "meta-llama/Llama-2-7b-hf" in err and "--model-path DIR" in err
    assert not (tmp_path / "o").exists()


def test_demo_details_read_as_words():
    from ckdiff.golden.suite import _summary
    s = _summary(_result(n=0))
    assert "{" not in s and "'" not in s and "1 cast, 1 equal" in s


# ---------------------------------------------------------------- the one report-writing path
def test_report_to_stdout_and_never_onto_an_input(tiny_hf, tmp_path, run_cli):
    a, b = tiny_hf(), tiny_hf(seed=1)
    code, out, err = run_cli(a, b, "--json", "-")
    doc = json.loads(out)
    assert code == 1 and doc["verdict"] == "differ" and "DIFFER" in err
    assert doc["command"] == f"ckdiff {a} {b} --json -"
    before = (a / "config.json").read_bytes()
    for flag in ("--markdown", "--html", "--json"):
        code, _, err = run_cli(a, b, flag, a / "config.json")
        assert code == 2 and "file of an input checkpoint" in err
    assert (a / "config.json").read_bytes() == before
    code, _, err = run_cli(a, b, "--json", "-", "--markdown", "-")
    assert code == 2 and "standard output" in err


@pytest.mark.parametrize("width", [60, 120])
def test_inspect_never_cuts_names(run_cli, ckdiff_golden, monkeypatch, width):
    monkeypatch.setenv("COLUMNS", str(width))
    meg = ckdiff_golden("llama-gqa", "megatron", tp=2)
    code, out, _ = run_cli("inspect", meg)
    assert code == 0 and "…" not in out
    name = "language_model.encoder.layers.{0..1}.self_attention.query_key_value.weight"
    row = next(k for k, x in enumerate(out.splitlines()) if x.startswith(name))
    line = out.splitlines()[row] if width == 120 else out.splitlines()[row + 1]
    assert "[96, 64]" in line and "float32" in line
