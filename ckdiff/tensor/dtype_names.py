"""Dtype names without importing torch: ``float32`` for torch.float32, one shared string per dtype."""
from __future__ import annotations

_NAMES: dict = {}


def dtype_name(dt) -> str:
    """``float32`` for torch.float32 (any object whose ``str`` is ``torch.<name>``, or a name already)."""
    name = _NAMES.get(dt)
    if name is None:
        name = _NAMES[dt] = str(dt).replace("torch.", "")
    return name
