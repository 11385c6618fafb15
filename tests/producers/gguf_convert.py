"""Runs llama.cpp's own ``convert_hf_to_gguf.py`` (from the llama-cpp-python sdist, vendor/llama.cpp)
several times in one process: the converter's import of torch and transformers is paid once.

Usage: python gguf_convert.py LLAMA_CPP_DIR HF_DIR:OUTTYPE:OUTFILE[:spm][:split=N]...

Each item is exactly the command line ``convert_hf_to_gguf.py HF_DIR --outtype OUTTYPE --outfile OUTFILE``
(the converter's ``main()`` with that argv); the converter uses its own bundled ``gguf-py``.

``:spm`` (Qwen3-MoE): the converter's GPT-2 BPE vocab step (``TextModel._set_vocab_gpt2``) accepts only a
hub tokenizer whose pre-tokenizer hash it knows, which an offline tiny tokenizer cannot be; for that item
the vocab is written by the converter's own sentencepiece step instead (as its Qwen2Model/Qwen3Model do).
Only the tokenizer metadata differs: the tensors and hyperparameters are the converter's as they are.

``:split=N``: the converter's own ``--split-max-tensors N`` (a split set, ``<OUTFILE stem>-00001-of-0000K.gguf``).
"""
import logging
import sys
from pathlib import Path


def main():
    root = Path(sys.argv[1])
    sys.path.insert(0, str(root))
    import convert_hf_to_gguf as conv  # noqa: E402 - the converter module of the sdist given
    from conversion import base  # noqa: E402 - the converter's model classes (same sdist)
    gpt2 = base.TextModel._set_vocab_gpt2
    for item in sys.argv[2:]:
        hf, outtype, outfile, *opt = item.split(":")
        sys.argv = ["convert_hf_to_gguf.py", hf, "--outtype", outtype, "--outfile", outfile]
        sys.argv += [a for o in opt if o.startswith("split=") for a in ("--split-max-tensors", o[len("split="):])]
        base.TextModel._set_vocab_gpt2 = base.TextModel._set_vocab_sentencepiece if "spm" in opt else gpt2
        conv.main()
        logging.getLogger().handlers.clear()


if __name__ == "__main__":
    main()
