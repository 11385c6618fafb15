"""Hostile GGUF files: counts checked against the file before the gguf package walks them, big-endian
files named as such, metadata errors naming the file. Fixtures: the gguf package's own GGUFWriter
(little- and big-endian) and, for claims no writer makes, a header packed by hand."""
import struct
import time

import numpy as np
import pytest


def _header(n_tensors: int, kvs: bytes, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs


def _key(k: str) -> bytes:
    return struct.pack("<Q", len(k)) + k.encode()


def _expect_2(run_cli, *argv, words=()):
    t0 = time.monotonic()
    code, out, err = run_cli(*argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ckdiff: error:"), (code, err)
    for w in words:
        assert w in lines[0], lines[0]
    assert time.monotonic() - t0 < 20
    return lines[0]


def test_array_of_a_billion_bytes_in_a_small_file(tmp_path, run_cli):
    p = tmp_path / "m.gguf"
    p.write_bytes(_header(0, _key("x") + struct.pack("<IIQ", 9, 0, 10**9), 1))  # ARRAY of UINT8, 10**9 long
    _expect_2(run_cli, "inspect", p, words=["m.gguf", "an array of 1000000000 elements"])


@pytest.mark.parametrize("claim", ["keys", "strings", "tensor bytes"])
def test_counts_beyond_the_file(tmp_path, run_cli, claim):
    p = tmp_path / "m.gguf"
    if claim == "keys":
        p.write_bytes(_header(0, b"", 10**12))
    elif claim == "strings":
        p.write_bytes(_header(0, _key("x") + struct.pack("<IIQ", 9, 8, 10**9), 1))  # ARRAY of STRING
    else:  # one F32 tensor of 2**40 x 2**20 elements
        info = _key("t") + struct.pack("<I", 2) + struct.pack("<QQ", 1 << 40, 1 << 20) + struct.pack("<IQ", 0, 0)
        p.write_bytes(_header(1, info, 0) + bytes(64))
    _expect_2(run_cli, "inspect", p, words=["m.gguf"])


def test_big_endian_gguf_is_named(tmp_path, run_cli):
    import gguf
    p = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(str(p), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _expect_2(run_cli, "inspect", p, words=["be.gguf", "big-endian GGUF is not supported"])


def test_gguf_metadata_errors_name_the_file(tmp_path, run_cli, tiny_hf):
    """A cross-layout compare needs the GGUF's config: its problem names the .gguf file."""
    import gguf
    p = tmp_path / "nohead.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(2)
    w.add_embedding_length(64)  # no attention.head_count
    g = np.random.default_rng(1)
    w.add_tensor("token_embd.weight", g.standard_normal((100, 64)).astype(np.float32))
    w.add_tensor("output_norm.weight", g.standard_normal(64).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _expect_2(run_cli, p, tiny_hf(), words=["nohead.gguf", "head_count"])


def test_a_million_tensors_is_refused_before_the_package_parses_them(tmp_path, run_cli):
    """Each tensor costs the gguf package's reader ~60 us and ~13 KB; a header of 10^6 (which the file is
    large enough to hold) is refused from the counts alone, fast and in one line."""
    p = tmp_path / "m.gguf"
    p.write_bytes(_header(10**6, b"", 0) + bytes(28 * 10**6))
    line = _expect_2(run_cli, "inspect", p, words=["m.gguf", "1000000 tensors"])
    assert "limits 65536" in line


def test_many_tensors_below_the_limit_are_read(tmp_path, run_cli):
    import gguf
    p = tmp_path / "many.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    rng = np.random.default_rng(0)
    for i in range(3000):
        w.add_tensor(f"t{i}.weight", rng.standard_normal(2).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, out, err = run_cli("inspect", p)
    assert code == 0 and "3000 tensors" in out, (code, err)
