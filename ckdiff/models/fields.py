"""Config values read with their types and ranges checked: ``Fields`` and the bounds every reader uses.

A wrong type or range is a ``ConfigError`` naming the file and the key."""
from __future__ import annotations

import math
from typing import Optional

import sys

from ckdiff.errors import InputError


# dtype names that configs use, accepted without importing torch; any other name is checked against torch
COMMON_DTYPES = frozenset(("float32", "float16", "bfloat16", "float64", "float", "half", "double"))


def _torch_dtype(name) -> bool:
    """Whether ``name`` names a torch dtype (``torch.<name>``)."""
    if not name:
        return False
    import torch
    return isinstance(getattr(torch, name, None), torch.dtype)


class ConfigError(InputError):
    """A value of config.json, params.json or Megatron args that is malformed, out of range, or
    contradicts the tensors."""


MAX_SIZE = 1 << 20       # hidden, FFN, head_dim, sliding window
MAX_COUNT = 1 << 16      # heads, layers, experts, parallel sizes
MAX_VOCAB = 1 << 24
MAX_POSITIONS = 1 << 32
MAX_THETA = 1e12
MAX_TOKEN_ID = (1 << 31) - 1


def _show(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int in Python


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def valid_int(v, lo: int = 1, hi: int = MAX_COUNT) -> Optional[int]:
    """``v`` when it is an int in [lo, hi], else None (readers that only use a value when it is sound)."""
    return v if _is_int(v) and lo <= v <= hi else None


class Fields:
    """Reads one config file's values with their types and ranges checked; every parser uses it.

    JSON ``null`` is an absent key. A wrong type or range is a ``ConfigError`` naming the file and the
    key: ``config.json: key 'rms_norm_eps': expected a positive finite number, got 'abc'``."""

    def __init__(self, src, where, label: str = "key"):
        if not isinstance(src, dict):
            raise ConfigError(where, f"expected a JSON object of keys and values, got {type(src).__name__}")
        self.src, self.where, self.label = src, where, label

    def fail(self, key, want, v):
        raise ConfigError(self.where, f"{self.label} {key!r}: expected {want}, got {_show(v)}")

    def int(self, key, lo: int = 1, hi: int = MAX_COUNT, unset=()) -> Optional[int]:
        v = self.src.get(key)
        if v is None or (_is_int(v) and v in unset):
            return None
        if not _is_int(v) or not lo <= v <= hi:
            want = "a positive integer" if lo == 1 else f"an integer >= {lo}"
            self.fail(key, f"{want} (at most {hi})" if _is_int(v) and v > hi else want, v)
        return v

    def num(self, key, hi: float = MAX_THETA) -> Optional[float]:
        v = self.src.get(key)
        if v is None:
            return None
        if not _is_num(v) or not math.isfinite(v) or v <= 0:
            self.fail(key, "a positive finite number", v)
        if v > hi:
            self.fail(key, f"a positive finite number (at most {hi:g})", v)
        return float(v)

    def nonneg(self, key, hi: float = MAX_THETA) -> Optional[float]:
        """A finite number >= 0 (zero is a value of its own: DeepSeek's ``mscale_all_dim`` 0 turns a scale off)."""
        v = self.src.get(key)
        if v is None:
            return None
        if not _is_num(v) or not math.isfinite(v) or not 0 <= v <= hi:
            self.fail(key, f"a finite number >= 0 (at most {hi:g})", v)
        return float(v)

    def flag(self, key) -> Optional[bool]:
        v = self.src.get(key)
        if v is None:
            return None
        if not isinstance(v, bool):
            self.fail(key, "true or false", v)
        return v

    def text(self, key, choices=None) -> Optional[str]:
        v = self.src.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or (choices is not None and v not in choices):
            self.fail(key, "one of " + ", ".join(choices) if choices else "a string", v)
        return v

    def dtype(self, key) -> Optional[str]:
        v = self.src.get(key)
        torch = sys.modules.get("torch")  # a torch dtype can only be here once torch is loaded
        if v is None or (torch is not None and isinstance(v, torch.dtype)):
            return None if v is None else str(v).replace("torch.", "")
        name = v.replace("torch.", "") if isinstance(v, str) else None
        if name != "auto" and name not in COMMON_DTYPES and not _torch_dtype(name):
            self.fail(key, "a dtype name (float32, bfloat16, ...)", v)
        return name

    def token_ids(self, key):
        v = self.src.get(key)
        if v is None or (_is_int(v) and v == -1):  # -1: "no such token" in older configs (pad_token_id)
            return None
        ok = lambda t: _is_int(t) and 0 <= t <= MAX_TOKEN_ID  # noqa: E731
        if not (ok(v) or (isinstance(v, list) and all(ok(t) for t in v))):
            self.fail(key, "a token id (a non-negative integer) or a list of them", v)
        return v

    def rope_scaling(self, key) -> Optional[dict]:
        v = self.src.get(key)
        if v is None:
            return None
        if not isinstance(v, dict):
            self.fail(key, "an object (rope_type, factor, ...)", v)
        sub = Fields(v, self.where, f"{self.label} {key!r} field")
        for k in ("factor", "low_freq_factor", "high_freq_factor", "rope_theta"):
            sub.num(k)
        sub.int("original_max_position_embeddings", hi=MAX_POSITIONS)
        for k in ("mscale", "mscale_all_dim"):  # YaRN's attention scales (DeepSeek): 0 or unset means unused
            sub.nonneg(k)
        sub.text("rope_type")
        sub.text("type")
        return v


# per layout: key -> kind; every value a parser uses is listed here
