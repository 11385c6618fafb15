"""Split GGUF sets (``<name>-00001-of-0000N.gguf``) read as one checkpoint.

Producers:
- llama.cpp's own ``convert_hf_to_gguf.py`` (llama-cpp-python 0.3.36 sdist, ``vendor/llama.cpp``; driven by
  tests/producers/gguf_convert.py) with ``--split-max-tensors 8`` on a tiny transformers Llama (GQA: 8 heads over
  2 KV heads, random weights), at f32 and q8_0, and the same model unsplit: 21 tensors in 3 shards.
- The hostile sets (a shard missing, a wrong ``split.no``, counts that do not add up, a tensor in two shards,
  a later shard contradicting the metadata, a misnamed shard) are written by gguf-py's own ``GGUFWriter``
  (the ``gguf`` package), one writer per shard with the split keys set as llama.cpp's writers set them, or by
  its split writer and then one split key edited in place (``GGUFReader(..., "r+")``).
A changed tensor is edited in place in a converted shard, as a converter with that bug would have written it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from producers import edit_gguf, gguf_converted, tiny_llama

SHARDS = 3  # 21 tensors at 8 a shard


@pytest.fixture(scope="session")
def split_gguf(tmp_path_factory):
    def sources(out):
        tiny_llama(out / "llama")
        items = []
        for t in ("f32", "q8_0"):
            (out / f"split-{t}").mkdir()
            items += [f"{out / 'llama'}:{t}:{out / f'llama.{t}.gguf'}",
                      f"{out / 'llama'}:{t}:{out / f'split-{t}' / f'llama.{t}.gguf'}:split=8"]
        return items
    return gguf_converted(tmp_path_factory, "gguf-split", sources, Path(__file__).read_text())


def shard(d: Path, t: str, k: int) -> Path:
    return d / f"split-{t}" / f"llama.{t}-{k:05d}-of-{SHARDS:05d}.gguf"


def test_converter_wrote_a_split_set(split_gguf):
    """The fixture is what the test needs: 3 shards, the split keys as llama.cpp documents them, the model
    metadata in the first shard only."""
    import gguf
    total = 0
    for k in range(1, SHARDS + 1):
        r = gguf.GGUFReader(str(shard(split_gguf, "f32", k)))
        f = {n: v.contents() for n, v in r.fields.items()}
        assert (f["split.no"], f["split.count"], f["split.tensors.count"]) == (k - 1, SHARDS, 21)
        assert ("llama.block_count" in f) == (k == 1)
        total += len(r.tensors)
    assert total == 21


@pytest.mark.parametrize("t", ["f32", "q8_0"])
def test_any_shard_or_the_directory_reads_the_whole_set(split_gguf, t):
    from ckdiff.formats.readers import open_checkpoint
    one = open_checkpoint(str(split_gguf / f"llama.{t}.gguf"))
    for spec in [shard(split_gguf, t, k) for k in (1, 2, 3)] + [split_gguf / f"split-{t}"]:
        ck = open_checkpoint(str(spec))
        assert ck.format == "gguf" and ck.path == str(shard(split_gguf, t, 1))
        assert sorted(ck.tensors) == sorted(one.tensors) and len(ck.meta["files"]) == SHARDS
        assert {n: (tuple(x.shape), x.dtype) for n, x in ck.tensors.items()} == \
               {n: (tuple(x.shape), x.dtype) for n, x in one.tensors.items()}
        assert not any(k.startswith("split.") for k in ck.config)
        for n in ("token_embd.weight", "blk.1.attn_q.weight", "output.weight"):  # from the first and last shards
            assert ck.tensors[n].load().equal(one.tensors[n].load()), n


def test_inspect_shows_one_checkpoint(split_gguf, run_cli):
    code, out, err = run_cli("inspect", shard(split_gguf, "f32", 2))
    assert code == 0, out + err
    assert "21 tensors" in out and "shards: 3" in out and "llama.f32-00001-of-00003.gguf" in out, out


@pytest.mark.parametrize("t", ["f32", "q8_0"])
def test_split_against_unsplit_is_identical(split_gguf, run_cli, t):
    one = split_gguf / f"llama.{t}.gguf"
    for s in (shard(split_gguf, t, 2), split_gguf / f"split-{t}"):
        for a, b in ((s, one), (one, s)):  # the verdict does not depend on the order
            code, out, err = run_cli(a, b)
            assert code == 0 and out.startswith("EQUIVALENT: 21 tensors (21 equal)"), out + err


@pytest.mark.parametrize("t", ["f32", "q8_0"])
def test_split_against_hf_as_the_unsplit_file(split_gguf, run_cli, t):
    hf = split_gguf / "llama"
    code, ref, err = run_cli(split_gguf / f"llama.{t}.gguf", hf)
    assert code == 0 and ref.startswith("EQUIVALENT"), ref + err
    for a, b in ((shard(split_gguf, t, 3), hf), (hf, shard(split_gguf, t, 1))):
        code, out, err = run_cli(a, b)
        assert code == 0 and out.splitlines()[0] == ref.splitlines()[0], out + err


def test_logits_of_a_split_set(split_gguf, run_cli):
    """The set runs in the HF runtime like one file: the q8_0 set against its float source, judged against the
    noise floor of the source encoded as the set stores each tensor."""
    code, out, err = run_cli("logits", split_gguf / "split-q8_0", split_gguf / "llama")
    assert code == 0 and out.startswith("EQUIVALENT"), out + err


def _copy_set(d: Path, t: str, to: Path) -> Path:
    shutil.copytree(d / f"split-{t}", to)
    return to


def test_a_tensor_changed_in_shard_2_is_found(split_gguf, run_cli, tmp_path):
    bad = _copy_set(split_gguf, "f32", tmp_path / "bad")
    p = bad / shard(split_gguf, "f32", 2).name
    changed = []

    def edit(r):
        t = next(x for x in r.tensors if x.name.endswith("ffn_down.weight") or x.name.endswith("attn_k.weight"))
        rows, cols = int(t.shape[1]), int(t.shape[0])  # GGUF dims are reversed: [cols, rows]
        t.data[rows // 2, cols - 1] += 0.5
        changed.extend((t.name, rows, cols))
    edit_gguf(p, p, edit)
    name, rows, cols = changed
    one = split_gguf / "llama.f32.gguf"
    for a, b in ((bad, one), (one, bad / shard(split_gguf, "f32", 1).name)):
        code, out, err = run_cli(a, b)
        assert code == 1 and out.startswith("DIFFER"), out + err
        assert name in out and f"[{rows // 2}, {cols - 1}]" in out, out


# ------------------------------------------------------------------ hostile sets (gguf-py's GGUFWriter)
def _write_set(d: Path, shards: list, keys=None, name="m") -> list:
    """One GGUFWriter per shard: the first with the model metadata, each with split.no / split.count /
    split.tensors.count as gguf-py's split writer types them (uint16, uint16, int32). ``keys``: per shard, a dict
    of split keys (or other metadata) to set instead."""
    import gguf
    d.mkdir(parents=True, exist_ok=True)
    n, total = len(shards), sum(len(s) for s in shards)
    paths = []
    for i, tensors in enumerate(shards):
        p = d / f"{name}-{i + 1:05d}-of-{n:05d}.gguf"
        w = gguf.GGUFWriter(str(p), "llama")
        if i:  # later shards hold only the split keys (as GGUFWriter's and gguf-split's sets do)
            w.kv_data[0].clear()
        else:
            w.add_block_count(1)
            w.add_embedding_length(8)
        k = {"split.no": i, "split.count": n, "split.tensors.count": total, **((keys or {}).get(i, {}))}
        for key, v in k.items():
            if v is None:
                continue
            if key == "split.tensors.count":
                w.add_int32(key, v)
            elif key.startswith("split."):
                w.add_uint16(key, v)
            else:
                w.add_uint32(key, v)
        for t in tensors:
            w.add_tensor(t, np.random.default_rng(len(paths) * 7 + len(t)).standard_normal((4, 8)).astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        paths.append(p)
    return paths


SET = [["token_embd.weight", "blk.0.attn_q.weight"], ["blk.0.attn_k.weight", "output_norm.weight"], ["output.weight"]]


def _one_line_error(run_cli, spec, *want):
    code, out, err = run_cli("inspect", spec)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, out + err
    for w in want:
        assert w in lines[0], lines[0]
    return lines[0]


def test_a_good_hostile_writer_set_reads(tmp_path, run_cli):
    """The writer used below makes a set ckdiff reads (so each failure below is the one fault injected)."""
    paths = _write_set(tmp_path / "ok", SET)
    code, out, err = run_cli("inspect", paths[1])
    assert code == 0 and "5 tensors" in out, out + err


def test_missing_shard(tmp_path, run_cli):
    paths = _write_set(tmp_path / "s", SET)
    paths[1].unlink()
    for spec in (paths[0], paths[2], tmp_path / "s"):
        _one_line_error(run_cli, spec, paths[1].name, "shard 2 of the split GGUF set of 3 is missing")


def test_wrong_split_no(tmp_path, run_cli):
    paths = _write_set(tmp_path / "s", SET, keys={2: {"split.no": 1}})
    _one_line_error(run_cli, paths[0], paths[2].name, "split.no is 1", "shard 3 of 3")


def test_split_no_edited_in_place_in_a_split_writer_set(tmp_path, run_cli):
    """A set written by GGUFWriter's own split support, then shard 2's split.no set to 0."""
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama", split_max_tensors=2)
    w.add_block_count(1)
    w.add_embedding_length(8)
    for i, t in enumerate(n for s in SET for n in s):
        w.add_tensor(t, np.random.default_rng(i).standard_normal((4, 8)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    p = tmp_path / "m-00002-of-00003.gguf"

    def edit(r):
        f = r.fields["split.no"]
        f.parts[f.data[0]][0] = 0
    edit_gguf(p, p, edit)
    _one_line_error(run_cli, tmp_path / "m-00001-of-00003.gguf", p.name, "split.no is 0")


def test_split_count_differs(tmp_path, run_cli):
    paths = _write_set(tmp_path / "s", SET, keys={1: {"split.count": 4}})
    _one_line_error(run_cli, paths[0], paths[1].name, "split.count is 4")


def test_tensor_count_does_not_add_up(tmp_path, run_cli):
    paths = _write_set(tmp_path / "s", SET, keys={i: {"split.tensors.count": 6} for i in range(3)})
    _one_line_error(run_cli, paths[2], paths[0].name, "split.tensors.count is 6, the 3 shards hold 5 tensors")
    paths = _write_set(tmp_path / "t", SET, keys={2: {"split.tensors.count": 6}})
    _one_line_error(run_cli, paths[0], paths[2].name, "split.tensors.count is 6")


def test_a_tensor_in_two_shards(tmp_path, run_cli):
    paths = _write_set(tmp_path / "s", [SET[0], SET[1] + ["blk.0.attn_q.weight"], SET[2]])
    _one_line_error(run_cli, paths[0], paths[1].name, "'blk.0.attn_q.weight'", f"also in {paths[0].name}")


def test_a_later_shard_contradicting_the_metadata(tmp_path, run_cli):
    paths = _write_set(tmp_path / "s", SET, keys={2: {"llama.block_count": 2}})
    _one_line_error(run_cli, paths[1], paths[2].name, "'llama.block_count' is 2", "says 1")


def test_a_shard_not_named_as_llama_cpp_names_it(tmp_path, run_cli):
    paths = _write_set(tmp_path / "s", SET)
    odd = paths[1].with_name("m-part2.gguf")
    paths[1].rename(odd)
    _one_line_error(run_cli, odd, odd.name, "must be named <name>-00002-of-00003.gguf")


def test_bad_split_key_values(tmp_path, run_cli):
    paths = _write_set(tmp_path / "s", SET, keys={0: {"split.no": 3}})
    _one_line_error(run_cli, paths[0], paths[0].name, "split.no")
    paths = _write_set(tmp_path / "t", SET, keys={0: {"split.tensors.count": None}})
    _one_line_error(run_cli, paths[0], paths[0].name, "split.tensors.count is missing")


def test_a_set_of_one_shard(tmp_path, run_cli):
    """split.count 1 (llama.cpp's gguf-split writes the keys even then) or 0 (a set merged by llama-gguf-split
    --merge keeps the first shard's keys with split.count 0) is one file: split.no is not needed, as llama.cpp
    reads it only for a count above 1, but split.tensors.count must be the file's own count."""
    p = _write_set(tmp_path / "s", SET[:1], keys={0: {"split.no": None}})[0]
    code, out, err = run_cli("inspect", p)
    assert code == 0 and "2 tensors" in out and "shards" not in out, out + err
    p = _write_set(tmp_path / "m", SET[:1], keys={0: {"split.count": 0}})[0]  # llama-gguf-split --merge's output
    code, out, err = run_cli("inspect", p)
    assert code == 0 and "2 tensors" in out and "shards" not in out, out + err
    p = _write_set(tmp_path / "t", SET[:1], keys={0: {"split.tensors.count": 9}})[0]
    _one_line_error(run_cli, p, p.name, "split.tensors.count is 9, the file holds 2 tensors")


def test_a_directory_of_two_sets_names_them(tmp_path, run_cli):
    _write_set(tmp_path / "d", SET, name="q4")
    _write_set(tmp_path / "d", SET[:2], name="q8")
    _one_line_error(run_cli, tmp_path / "d", "holds 2 split GGUF sets (q4-*-of-00003.gguf, q8-*-of-00002.gguf)")
    code, out, err = run_cli("inspect", tmp_path / "d" / "q8-00002-of-00002.gguf")  # one shard names its set
    assert code == 0 and "4 tensors" in out and "shards: 2" in out, out + err


def test_a_set_claiming_more_tensors_than_one_file_may_hold(tmp_path, run_cli):
    """split.tensors.count is bounded like one file's tensor count (65536): a claim beyond it is refused before
    any other shard is opened."""
    paths = _write_set(tmp_path / "s", SET, keys={0: {"split.tensors.count": 1 << 20}})
    _one_line_error(run_cli, paths[0], paths[0].name, "'split.tensors.count'", "at most 65536")
