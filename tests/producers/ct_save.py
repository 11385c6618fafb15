"""Writes compressed-tensors checkpoints with compressed-tensors' own compressors.

Usage: python ct_save.py HF_DIR OUT SCHEME...

For each SCHEME (see SCHEMES) the transformers model in HF_DIR gets the scheme on every Linear but
lm_head (``apply_quantization_config``), its weight scales / zero points / global scales from
compressed-tensors' own ``calculate_qparams`` (``generate_gparam`` for NVFP4) over min/max of each
strategy's unit (what llm-compressor's min-max observer feeds it), then
``ModelCompressor.from_pretrained_model(model, quantization_format=...)``, ``compress_model`` and
``save_pretrained`` + ``update_config`` into ``OUT/SCHEME`` (a directory as llm-compressor saves).
"""
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402


def _args(**kw):
    from compressed_tensors.quantization import QuantizationArgs
    return QuantizationArgs(**kw)


def _block(scheme, block):
    """The preset with smaller blocks: the tiny model's 16..96 rows and 64..96 columns then hold several
    blocks, partial ones at the edges (the preset's 128 x 128 would be one partial block per weight)."""
    scheme.weights = scheme.weights.model_copy(update={"block_structure": block})
    return scheme


def schemes():
    from compressed_tensors.quantization import preset_name_to_scheme, QuantizationScheme
    W = lambda **kw: QuantizationScheme(targets=["Linear"], weights=_args(**kw))  # noqa: E731
    return {  # name -> (scheme, format)
        "fp8-block": (_block(preset_name_to_scheme("FP8_BLOCK", ["Linear"]), [32, 48]), "float-quantized"),
        "fp8-channel": (W(num_bits=8, type="float", strategy="channel", symmetric=True), "float-quantized"),
        "fp8-tensor": (W(num_bits=8, type="float", strategy="tensor", symmetric=True), "float-quantized"),
        "int4-group": (W(num_bits=4, type="int", strategy="group", group_size=32, symmetric=True), "pack-quantized"),
        "int4-group-zp": (W(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False),
                          "pack-quantized"),
        "int8-channel": (W(num_bits=8, type="int", strategy="channel", symmetric=True), "pack-quantized"),
        "int8-channel-zp": (W(num_bits=8, type="int", strategy="channel", symmetric=False), "pack-quantized"),
        "int4-channel": (W(num_bits=4, type="int", strategy="channel", symmetric=True), "pack-quantized"),
        "nvfp4": (preset_name_to_scheme("NVFP4A16", ["Linear"]), "nvfp4-pack-quantized"),
    }


def _minmax(w, a):
    s = getattr(a.strategy, "value", a.strategy)
    if s == "tensor":
        return w.amin(), w.amax()
    if s == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if s in ("group", "tensor_group"):
        g = w.unflatten(1, (-1, a.group_size))
        return g.amin(-1), g.amax(-1)
    if s == "block":
        b0, b1 = a.block_structure
        r, c = -(-w.shape[0] // b0), -(-w.shape[1] // b1)
        p = torch.nn.functional.pad(w, (0, c * b1 - w.shape[1], 0, r * b0 - w.shape[0]))  # zeros: min/max keep 0
        g = p.reshape(r, b0, c, b1)
        return g.amin((1, 3)), g.amax((1, 3))
    raise ValueError(s)


def main():
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
    from transformers import AutoModelForCausalLM
    hf, out = Path(sys.argv[1]), Path(sys.argv[2])
    table = schemes()
    for name in sys.argv[3:]:
        scheme, fmt = table[name]
        model = AutoModelForCausalLM.from_pretrained(hf, dtype="auto")  # the source's dtype
        apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
        with torch.no_grad():
            for _, m in model.named_modules():
                qs = getattr(m, "quantization_scheme", None)
                if qs is None or qs.weights is None:
                    continue
                a = qs.weights
                lo, hi = _minmax(m.weight, a)  # in the weight's dtype, as llm-compressor's observers
                gs = None
                if hasattr(m, "weight_global_scale"):
                    gs = generate_gparam(m.weight.amin(), m.weight.amax())
                    m.weight_global_scale.data.copy_(gs.reshape(m.weight_global_scale.shape))
                scale, zp = calculate_qparams(lo, hi, a, global_scale=gs)
                m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
                if hasattr(m, "weight_zero_point"):
                    m.weight_zero_point.data.copy_(zp.reshape(m.weight_zero_point.shape))
        comp = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
        comp.compress_model(model)
        model.save_pretrained(out / name)
        comp.update_config(out / name)


if __name__ == "__main__":
    main()
