"""Runs llama.cpp's own ``convert_hf_to_gguf.py`` (from the llama-cpp-python sdist, vendor/llama.cpp)
several times in one process: the converter's import of torch and transformers is paid once.

Usage: python gguf_convert.py LLAMA_CPP_DIR HF_DIR:OUTTYPE:OUTFILE...

Each item is exactly the command line ``convert_hf_to_gguf.py HF_DIR --outtype OUTTYPE --outfile OUTFILE``
(the converter's ``main()`` with that argv); the converter uses its own bundled ``gguf-py``.
"""
import logging
import sys
from pathlib import Path


def main():
    root = Path(sys.argv[1])
    sys.path.insert(0, str(root))
    import convert_hf_to_gguf as conv  # noqa: E402 - the converter module of the sdist given
    for item in sys.argv[2:]:
        hf, outtype, outfile = item.split(":")
        sys.argv = ["convert_hf_to_gguf.py", hf, "--outtype", outtype, "--outfile", outfile]
        conv.main()
        logging.getLogger().handlers.clear()


if __name__ == "__main__":
    main()
