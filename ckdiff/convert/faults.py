"""Explicit injection points for the mutation self-test (tests/selftest/catalogue.py).

Each converter function in convert/api.py takes ``faults=None``. Given a :class:`Faults`, it passes
what it reads, the config it parses, every conversion table (both directions, in layouts.convert), the
converted tensors and the config file it writes through the matching hook, so a known bug can be
injected into one run without monkeypatching any module. Production code never passes one; a hook left
``None`` is the identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Step:
    """Where a hook is called: the converter, the layout it writes, the config, its parallel sizes."""
    converter: str
    layout: str
    cfg: Any = None
    tp: int = 1
    pp: int = 1


@dataclass(frozen=True)
class Faults:
    read: Optional[Callable] = None    # (Checkpoint, Step) -> Checkpoint: the checkpoint as read
    parsed: Optional[Callable] = None  # (ModelConfig) -> ModelConfig: the config parsed from the source
    rules: Optional[Callable] = None   # (layout, cfg, rules) -> rules: each table hf <-> layout
    output: Optional[Callable] = None  # (tensors, Step) -> tensors: the converted lazy tensors
    config: Optional[Callable] = None  # (dict, Step) -> dict: the config file about to be written

    def on_read(self, ck, step: Step):
        return self.read(ck, step) if self.read else ck

    def on_parsed(self, cfg):
        return self.parsed(cfg) if self.parsed else cfg

    def on_rules(self, layout: str, cfg, rules: list) -> list:
        return self.rules(layout, cfg, rules) if self.rules else rules

    def on_output(self, tensors: dict, step: Step) -> dict:
        return self.output(tensors, step) if self.output else tensors

    def on_config(self, config: dict, step: Step) -> dict:
        return self.config(config, step) if self.config else config


NONE = Faults()
