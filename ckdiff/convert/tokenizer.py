"""Tokenizer export for megatron-to-hf: a SentencePiece model -> HF tokenizer files.

Megatron's SentencePiece tokenizer appends <CLS>, <SEP>, <EOD>, <MASK>, <PAD> and
then the extra ids. They are added only when the embedding has rows for them, so
the tokenizer never outgrows the vocabulary (Megatron-LLM ``megatron/tokenizer/tokenizer.py``
``_SentencePieceTokenizer`` adds them unconditionally, which can exceed the embedding rows).
Written as the slow Llama tokenizer files (tokenizer.model + tokenizer_config.json
+ special_tokens_map.json), which transformers loads without a network.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ckdiff.errors import InputError, UsageError

MEGATRON_SPECIALS = ["<CLS>", "<SEP>", "<EOD>", "<MASK>", "<PAD>"]
SPECIAL_KEYS = ("bos", "cls", "eos", "mask", "pad", "sep", "unk")


def export_tokenizer(vocab_file, out: Path, vocab_rows: int, extra_ids=(), overrides=()) -> dict:
    import sentencepiece as spm
    vf = Path(vocab_file)
    if vf.is_dir():
        vf = vf / "tokenizer.model"
    if not vf.is_file():
        raise InputError(vf, "vocab file not found")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(vf))
    except (OSError, RuntimeError) as e:
        raise InputError(vf, f"not a SentencePiece model ({str(e).splitlines()[0][:120]})") from None
    n = sp.GetPieceSize()
    pieces = {sp.IdToPiece(i): i for i in range(n)}
    if n > vocab_rows:
        raise InputError(vf, f"tokenizer has {n} pieces but the embedding only {vocab_rows} rows")
    added = []
    if n + len(MEGATRON_SPECIALS) + len(extra_ids) <= vocab_rows:
        added = MEGATRON_SPECIALS + list(extra_ids)
    elif n + len(extra_ids) <= vocab_rows:
        added = list(extra_ids)
    elif extra_ids:
        raise UsageError(f"{len(extra_ids)} extra ids do not fit: {n} pieces, {vocab_rows} embedding rows")
    ids = dict(pieces)
    for i, tok in enumerate(added):
        ids.setdefault(tok, n + i)
    special = {"bos": sp.IdToPiece(sp.bos_id()) if sp.bos_id() >= 0 else None,
               "eos": sp.IdToPiece(sp.eos_id()) if sp.eos_id() >= 0 else None,
               "unk": sp.IdToPiece(sp.unk_id()) if sp.unk_id() >= 0 else None}
    if "<CLS>" in added:
        special.update(cls="<CLS>", sep="<SEP>", mask="<MASK>", pad="<PAD>")
    for ov in overrides:
        if "=" not in ov:
            raise UsageError(f"--override_special_tokens {ov!r}: expected KEY=VALUE")
        k, v = ov.split("=", 1)
        if k not in SPECIAL_KEYS:
            raise UsageError(f"--override_special_tokens: key {k!r} not in {', '.join(SPECIAL_KEYS)}")
        if v not in ids:
            raise UsageError(f"--override_special_tokens {k}={v}: {v!r} is not in the vocabulary")
        special[k] = v
    shutil.copyfile(vf, out / "tokenizer.model")
    cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
           "legacy": True, "clean_up_tokenization_spaces": False,
           "added_tokens_decoder": {str(ids[t]): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                  "normalized": False, "single_word": False} for t in added}}
    cfg.update({f"{k}_token": v for k, v in special.items() if v is not None})
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {f"{k}_token": v for k, v in special.items() if v is not None}, indent=2) + "\n")
    return {"pieces": n, "added": added, "special": special, "ids": {t: ids[t] for t in added}}
