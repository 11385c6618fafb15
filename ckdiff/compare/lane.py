"""Plain safetensors checkpoints compared without torch.

``ckdiff A B`` on two Hugging Face directories (or two ``.safetensors`` files) whose tensors are plain floats
needs nothing from torch: the bytes are compared by memcmp, the metrics of a differing tensor come from the
numba kernels, which read raw bytes, and the diagnosis works on numpy arrays. Importing torch costs more than
the whole comparison of a 1 GiB pair (0.65-1 s on the 2-core benchmark machine), so such a pair is read here
with the torch-free header parser (io/safetensors_header.py) and the same directory rules as the reader
(io/weight_files.py), and compared by the same functions as the full comparison: compare/tensor.py per tensor,
compare/diff.py's ``compare_config_semantics`` for the configs, compare/diagnose.py for the causes. The
result is the one compare/diff.py builds for the pair (tests/test_lane.py holds the two equal, field by field,
on transformers-written checkpoints and their mutations, and checks that the process never loads torch).

Only what provably reads the same way without torch is taken; anything else is declined (``None``) and the
full comparison runs:
- each side a ``.safetensors`` file, or a directory of ``config.json`` with ``*.safetensors`` (or their
  ``model.safetensors.index.json``) and nothing another format's detection could claim (the files allowed
  are listed in ``_ALLOWED``; no sub-directory);
- both sides of one kind, holding the same tensor names (shapes may differ), every tensor F64/F32/F16/BF16, file metadata
  plain, no tensor name that an encoding (scales, codes, packed weights), a fused-expert view or a stored
  rotary buffer would read differently;
- a config without a quantization section, of a model family without family-specific diagnoses;
- a header, index or config the reader would refuse (the full comparison then names the problem).
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Optional

import numpy as np

from ckdiff.compare.quick import FLOATS, PLAIN_METADATA
from ckdiff.compare.status import Status
from ckdiff.errors import InputError
from ckdiff.io.safetensors_header import MappedFile
from ckdiff.tensor.lazy import Checkpoint, LazyTensor

# the files of a plain HF model directory: weights, configs, tokenizer and model-card files
_ALLOWED = re.compile(r"(config\.json|generation_config\.json|model\.safetensors\.index\.json|[^/]*\.safetensors"
                      r"|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json"
                      r"|vocab\.json|merges\.txt|chat_template\.(jinja|json)|README\.md|LICENSE(\.\w+)?|NOTICE"
                      r"|USE_POLICY\.md|\.gitattributes)")
# tensor names that an encoding (block scales, packed codes), transformers 5's fused experts or a stored
# rotary buffer give another reading than plain floats compared by name
_SPECIAL = re.compile(r"(scale|scales|scale_inv|scaler|blocks|biases|zero_point|packed|weight_shape|global_scale)$"
                      r"|experts\.(gate_up_proj|down_proj)|rotary_emb\.inv_freq$|^rope\.freqs$")
_QUANTIZED = ("quantization_config", "compression_config", "quantization")


class LaneTensor(LazyTensor):
    """A plain float tensor of a mapped safetensors file; ``load``/``rows`` give numpy arrays of its values
    (bfloat16 and float16 widened to float32 exactly, as the diagnosis reads any side)."""
    __slots__ = ("file", "lo", "hi")

    def __init__(self, name, file: MappedFile, dtype, shape, lo, hi):
        self.name, self.shape, self.dtype, self.origin = name, shape, dtype, file.origin
        self.file, self.lo, self.hi = file, lo, hi

    def _stored(self, byte_lo: int, byte_hi: int, shape) -> np.ndarray:
        raw = self.file.view(byte_lo, byte_hi - byte_lo)
        return raw.view(_STORED[self.dtype.name]).reshape(shape)

    def stored(self) -> np.ndarray:
        """The whole tensor as stored, read-only, nothing copied: float32/float64/float16 as numpy holds
        them, bfloat16 as its 16-bit words (the diagnosis matches rows on these bytes)."""
        return self._stored(self.lo, self.hi, self.shape)

    def load(self) -> np.ndarray:
        return float_values(self.stored(), self.dtype.name)

    def rows(self, start: int, stop: int) -> np.ndarray:
        if not self.shape:
            return self.load().reshape(1)
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        shape = (stop - start,) + self.shape[1:]
        return float_values(self._stored(self.lo + start * row, self.lo + stop * row, shape), self.dtype.name)


# how numpy holds each dtype's stored elements
_STORED = {"bfloat16": "<u2", "float16": "<f2", "float32": "<f4", "float64": "<f8"}


def float_values(stored: np.ndarray, name: str) -> np.ndarray:
    """The values of elements of dtype ``name`` as stored (``LaneTensor.stored``): float32/float64 as they
    are (a copy: the map is read-only), bfloat16 and float16 widened to float32 (exact; bfloat16 is the upper
    half of a float32)."""
    if name == "bfloat16":
        w = stored.astype(np.uint32)
        w <<= 16
        return w.view(np.float32)
    if name == "float16":
        return stored.astype(np.float32)
    return stored.copy()


def _read_file(path: Path) -> dict:
    f = MappedFile(path, FLOATS)
    if f.metadata not in PLAIN_METADATA:
        raise _Declined
    out = {n: LaneTensor(n, f, *e) for n, e in f.entries.items()}
    f.entries = None
    return out


class _Declined(Exception):
    """The pair is not one this lane reads exactly as the full comparison does."""


def _side(spec: str) -> Checkpoint:
    from ckdiff.io.inputs import read_json_object
    from ckdiff.io.weight_files import _hf_weight_files, _merge_files, _read_indexed
    p = Path(spec)
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        raise _Declined from None
    if stat.S_ISREG(st.st_mode):
        if p.suffix != ".safetensors":
            raise _Declined
        return Checkpoint(str(p), "file", _read_file(p), meta={"files": [str(p)], "config_where": str(p)})
    if not stat.S_ISDIR(st.st_mode):
        raise _Declined
    for e in os.scandir(p):
        if not _ALLOWED.fullmatch(e.name) or not e.is_file():  # is_file follows links (hub snapshots)
            raise _Declined
    kind, what = _hf_weight_files(p)
    if not os.path.isfile(p / "config.json") or kind is None:
        raise _Declined
    if kind == "index":
        if what.name != "model.safetensors.index.json":
            raise _Declined
        tensors = _read_indexed(p, what, _read_file)
        files = sorted({t.origin for t in tensors.values()})
    else:
        tensors, files = _merge_files(what, _read_file, p), [str(f) for f in what]
    config = read_json_object(p / "config.json")
    if any(k in config for k in _QUANTIZED):
        raise _Declined
    from ckdiff.models import families
    fam = families.for_model_type(str(config.get("model_type") or ""))
    if fam is not None and (fam.dropped or fam.diagnose):
        raise _Declined
    return Checkpoint(str(p), "hf", tensors, config=config,
                      meta={"files": files, "notes": [], "config_where": str(p / "config.json")})


def open_plain_pair(a: str, b: str) -> Optional[tuple[Checkpoint, Checkpoint]]:
    """Both sides read without torch, or None when either is not a plain pair this lane takes. Each path
    and weight file read is recorded as an input (io/inputs.py), as the readers record them, so no report
    is ever written over one."""
    try:
        ca, cb = _side(a), _side(b)
    except (_Declined, InputError, OSError, ValueError):
        return None
    if ca.format != cb.format or set(ca.tensors) != set(cb.tensors) or any(_SPECIAL.search(n) for n in ca.tensors):
        return None
    from ckdiff.io.inputs import note_input
    for ck in (ca, cb):
        for f in [ck.path, *ck.meta["files"]]:
            note_input(f)
    return ca, cb


def compare_plain(a: str, b: str, diagnose: bool = True, progress_factory=None):
    """The CompareResult of ``ckdiff A B`` with default options on a plain pair, or None (the full
    comparison decides)."""
    pair = open_plain_pair(a, b)
    return None if pair is None else compare_plain_pair(*pair, diagnose=diagnose, progress_factory=progress_factory)


def compare_plain_pair(ca: Checkpoint, cb: Checkpoint, diagnose: bool = True, progress_factory=None):
    """The comparison of a pair ``open_plain_pair`` read, with default options. The steps are compare/diff.py's
    ``compare_checkpoints`` for two checkpoints of one layout with the same names: nothing is mapped, no
    tied-head view applies, every tensor is in the results."""
    from ckdiff.compare.coverage import unaccounted_note
    from ckdiff.compare.diff import CompareResult, Options, compare_config_semantics, compare_tensor
    opts = Options(diagnose=diagnose)
    cdiff, cfindings, cnotes, cwarnings = compare_config_semantics(ca, cb)
    names = list(ca.tensors)
    progress = progress_factory(sum(ca.tensors[n].nbytes + cb.tensors[n].nbytes for n in names)) \
        if progress_factory else None
    rows = [compare_tensor(n, ca.tensors[n], cb.tensors[n], opts, progress) for n in names]
    if progress is not None and hasattr(progress, "stop"):
        progress.stop()
    res = CompareResult(ca.path, cb.path, ca.format, cb.format, rows, config_diff=cdiff, config_findings=cfindings,
                        warnings=cwarnings, strict=False,
                        options={"atol": None, "rtol": None, "only": [], "ignore": [], "patterns": []},
                        notes=list(cnotes), mapping=[])
    side = {"read": len(names), "consumed_by_rules": 0, "targets": len(names), "in_results": len(names),
            "ignored": 0, "dropped": {}, "unaccounted": []}
    res.coverage = {"A": dict(side), "B": dict(side)}
    res.notes += unaccounted_note(res.coverage)
    # the diagnosis has work only where a tensor differs (no one-sided tensor here, no family-specific
    # diagnosis); it runs on the numpy arrays these tensors load as
    if diagnose and any(r.status in (Status.DIFFER, Status.SHAPE) for r in rows):
        from ckdiff.compare.diagnose import diagnose_result
        diagnose_result(res, ca, cb)
    return res
