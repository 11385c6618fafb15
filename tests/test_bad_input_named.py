"""Three bad inputs that once ended unclearly, each now one line naming the file and the problem (exit 2):
a JetStream scale that is not finite, a Megatron-LLM iteration holding rank directories of both namings,
and a converter's model argument that does not fit the checkpoint's config. Checkpoints written by
ckdiff's own converters, then damaged the way the hostile corpus damaged them."""
import shutil

from safetensors.torch import load_file, save_file


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckdiff: error: "), err
    return lines[0]


def test_jetstream_scale_not_finite_is_named(tiny_hf, tmp_path, run_cli):
    src = tiny_hf("llama-gqa")
    js = tmp_path / "js"
    assert run_cli("convert", "to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir", src,
                   "--output_checkpoint_dir", js, "--quantize_weights", "--quantize_type", "int8_per_channel",
                   "-q")[0] == 0
    t = load_file(js / "model.safetensors")
    name = "layers.1.attention.wq.weight_scaler"
    t[name] = t[name].clone()
    t[name][5] = float("inf")
    save_file(t, js / "model.safetensors", metadata={"format": "pt"})
    for argv in ((src, js), ("logits", src, js), ("convert", "jetstream-to-hf", "--input_checkpoint_dir", js,
                                                  "--output_checkpoint_dir", tmp_path / "back")):
        code, _, err = run_cli(*argv)
        line = _one_line(err)
        assert code == 2 and "model.safetensors" in line and name in line and "not a finite number" in line, line
    assert not (tmp_path / "back").exists()  # nothing that looks like output


def test_megatron_rank_directories_of_both_namings_refused(tiny_hf, tmp_path, run_cli):
    out = tmp_path / "mg"
    assert run_cli("convert", "hf-to-megatron", "llama2", "--model-path", tiny_hf("llama-gqa"), "--tp", "2",
                   "--out", out, "-q")[0] == 0
    it = next(p for p in out.iterdir() if p.is_dir())
    shutil.copytree(it / "mp_rank_00", it / "mp_rank_00_000")  # a TP+PP set beside the TP-only one
    for argv in (("inspect", out), (out, out), ("convert", "megatron-to-hf", "--input_dir", out,
                                                 "--output_dir", tmp_path / "hf")):
        code, _, err = run_cli(*argv)
        line = _one_line(err)
        assert code == 2 and "mp_rank_00/" in line and "mp_rank_00_000/" in line and "both namings" in line, line


def test_model_argument_that_does_not_fit_names_the_config(tiny_hf, tmp_path, run_cli):
    src = tiny_hf("mixtral")
    code, _, err = run_cli("convert", "hf-to-megatron", "llama2", "--model-path", src, "--out", tmp_path / "o")
    line = _one_line(err)
    assert code == 2 and str(src / "config.json") in line and "mixtral" in line, line
    code, _, err = run_cli("convert", "to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir", src,
                           "--output_checkpoint_dir", tmp_path / "js")
    line = _one_line(err)
    assert code == 2 and str(src / "config.json") in line and "mixtral" in line, line
    assert not (tmp_path / "o").exists() and not (tmp_path / "js").exists()
