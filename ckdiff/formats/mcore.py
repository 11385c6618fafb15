"""Megatron-Core ``torch_dist`` iteration directories: read in place, mapped to HF by a table.

Everything Megatron-Core-specific lives here, declaratively (names, orders, args), so a
registry can pick it up as one declaration. Facts were checked against NVIDIA/Megatron-LM
``megatron/core`` at commit d98e8a64 (2026-08-22) and ``megatron/training/arguments.py``, and on files
megatron-core 0.16.1 itself writes (tests/test_producer_mcore.py):

- ``metadata.json`` = ``{"sharded_backend": "torch_dist", ...}``; the tensors are a torch DCP
  checkpoint (``.metadata`` + ``*.distcp``, read by formats/dcp.py) at their global shapes.
- Common state: ``common.pt`` (legacy) or a DCP byte item ``common_state/shard_0_1`` holding
  ``torch.save([state])``; ``state["args"]`` is the training ``argparse.Namespace``.
- Homogeneous layers are stacked: ``decoder.layers.<suffix>`` with a leading ``num_layers`` axis;
  otherwise ``decoder.layers.<i>.<suffix>``. MoE experts add an expert axis
  (``mlp.experts.linear_fc1.weight`` = ``[L?, E, 2F, H]``); sequential and grouped-GEMM experts
  are stored alike. Both forms are read as per-layer, per-expert tensors here.
- ``linear_qkv`` rows are in query-group order ``[q x H/K, k, v] x K``; ``linear_fc1`` is
  ``[gate; up]``; layer norms are ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``
  (fused, TE and local specs alike on disk) or ``input_layernorm`` / ``pre_mlp_layernorm``
  (separate, MoE layers); rotary is rotate_half unless ``args.rotary_interleaved``.
- The embedding (and ``output_layer``) are padded to ``args.padded_vocab_size``; rows past
  ``args.vocab_size`` are padding. ``output_layer.weight`` is absent when tied.
- ``*._extra_state`` (Transformer Engine FP8 metadata) carries no weights: skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import re
import types
from pathlib import Path

import torch

from ckdiff.models import families
from ckdiff.errors import InputError
from ckdiff.models.families import Mlp
from ckdiff.io.inputs import read_json_object
from ckdiff.models.config import ModelConfig
from ckdiff.tensor.lazy import Checkpoint, LazyTensor, RowSlice
from ckdiff.tensor.ops import Chain, Concat, Each, FuseQKV, Identity, PermuteRope
from ckdiff.tensor.table import R

BACKEND = "torch_dist"
COMMON_KEY = "common_state/shard_0_1"
TRACKER = "latest_checkpointed_iteration.txt"

# ------------------------------------------------------------------ names (per layer, as read)
_L = "decoder.layers.{i}."
MCORE = {
    "embed": "embedding.word_embeddings.weight", "norm": "decoder.final_layernorm.weight",
    "head": "output_layer.weight",
    "qkv": _L + "self_attention.linear_qkv.weight", "o": _L + "self_attention.linear_proj.weight",
    "attn_norm": _L + "self_attention.linear_qkv.layer_norm_weight",
    "attn_norm_sep": _L + "input_layernorm.weight",
    "mlp_norm": _L + "mlp.linear_fc1.layer_norm_weight", "mlp_norm_sep": _L + "pre_mlp_layernorm.weight",
    "fc1": _L + "mlp.linear_fc1.weight", "fc2": _L + "mlp.linear_fc2.weight",
    "router": _L + "mlp.router.weight",
    "expert": _L + "mlp.experts.local_experts.{e}.linear_{n}.weight",
}
# keys with an expert axis on disk, and the per-expert name each expert is read as
# (megatron-core 0.16.1's SequentialMLP writes ``mlp.experts.experts.linear_fc1.weight``: its sharded prefix
# ``experts.`` under the module's own ``experts.``; TEGroupedMLP/newer trees ``mlp.experts.linear_fc1.weight``)
_EXPERT_KEY = re.compile(r"^(decoder\.layers\.(?:\d+\.)?mlp\.experts)\.(?:experts\.)?(linear_fc[12]\.weight)$")
_GROUPED = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts)\.(linear_fc[12])\.weight(\d+)$")
DROP = [r"\._extra_state(/.*)?$"]


# ------------------------------------------------------------------ common state (args)
def load_common(path: Path, window=None) -> dict:
    """The common state (``args`` and friends) of a torch.save archive (``common.pt``, or the byte range
    ``window`` of a ``.distcp`` file), read under the torch policy of io/unpickle.py: plain
    data, tensors, ``argparse.Namespace`` and inert stand-ins for Megatron enums and numpy values."""
    from ckdiff.io.unpickle import load_torch
    obj = load_torch(path, window, "common state")
    if isinstance(obj, list) and obj:  # the in-DCP form is torch.save([state, ...])
        obj = obj[0]
    if not isinstance(obj, dict):
        raise InputError(path, f"common state is a {type(obj).__name__}, expected a dict")
    return obj


def _args_dict(state: dict) -> dict:
    a = state.get("args")
    if a is None:
        return {}
    d = vars(a) if isinstance(a, (argparse.Namespace, types.SimpleNamespace)) else a
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None), list, tuple))} \
        if isinstance(d, dict) else {}


# ------------------------------------------------------------------ reader
def _iteration_dir(p: Path) -> Path:
    if (p / TRACKER).exists() or (p / TRACKER).is_symlink():
        from ckdiff.formats.megatron_llm import read_tracker  # regular file only, bounded, never quoted in errors
        tag = read_tracker(p / TRACKER)
        sub = p / ("release" if tag == "release" else f"iter_{int(tag):07d}")
        if sub.is_dir():
            return sub
    return p


def _backend(p: Path):
    f = p / "metadata.json"
    if not f.is_file():
        return None
    try:
        return read_json_object(f).get("sharded_backend")
    except (InputError, ValueError, OSError, AttributeError):
        return None


def is_mcore_dir(p: Path) -> bool:
    if not p.is_dir():
        return False
    it = _iteration_dir(p)
    return _backend(it) == BACKEND and (it / ".metadata").is_file()


def _per_layer(name: str, t, args: dict, notes: list) -> dict:
    """Per-layer (and per-expert) tensors of one DCP key."""
    from ckdiff.formats.dcp import SubTensor
    out = {}
    L = args.get("num_layers")
    m = _EXPERT_KEY.match(name)
    stacked_layers = name.startswith("decoder.layers.") and not re.match(r"^decoder\.layers\.\d+\.", name)
    if stacked_layers:
        if not isinstance(L, int) or not t.shape or t.shape[0] != L:
            raise InputError(t.origin, f"{name!r} has shape {list(t.shape)}: expected a leading axis of "
                                       f"num_layers = {L} (layer-stacked key)")
    if m:
        E = args.get("num_experts")
        lead = 1 if stacked_layers else 0
        if len(t.shape) < lead + 1 or (isinstance(E, int) and t.shape[lead] != E):
            raise InputError(t.origin, f"{name!r} has shape {list(t.shape)}: expected an expert axis of "
                                       f"num_experts = {E}")
        n = m.group(2).split(".")[0].replace("linear_", "")
        for i in range(L if stacked_layers else 1):
            for e in range(t.shape[lead]):
                base = m.group(1).replace("decoder.layers.", f"decoder.layers.{i}.") if stacked_layers else m.group(1)
                k = f"{base}.local_experts.{e}.linear_{n}.weight"
                out[k] = SubTensor(k, t, (i, e) if stacked_layers else (e,))
        return out
    if stacked_layers:
        suffix = name[len("decoder.layers."):]
        for i in range(L):
            k = f"decoder.layers.{i}.{suffix}"
            out[k] = SubTensor(k, t, (i,))
        return out
    g = _GROUPED.match(name)
    if g:
        k = f"{g.group(1)}.local_experts.{g.group(3)}.{g.group(2)}.weight"
        out[k] = t
        return out
    out[name] = t
    return out


def read_mcore(p: Path, **_) -> Checkpoint:
    from ckdiff.formats.dcp import read_dcp_entries
    it = _iteration_dir(p)
    raw, items, _md = read_dcp_entries(it)
    notes: list = []
    if COMMON_KEY in items:
        f, off, n, tr = items[COMMON_KEY]
        if tr:
            raise InputError(f, f"DCP stream transform {list(tr)} of the common state is not supported")
        state = load_common(f, (off, n))
    elif (it / "common.pt").is_file():
        state = load_common(it / "common.pt")
    else:
        raise InputError(it, "Megatron-Core checkpoint without common state (no common.pt and no "
                             f"{COMMON_KEY!r} item): the model config (args) is missing")
    args = _args_dict(state)
    if not args:
        raise InputError(it, "the common state holds no args: the model config is missing")
    skipped = {k: "Transformer Engine extra state (no weights)" if "_extra_state" in k else "non-tensor item"
               for k in items if k != COMMON_KEY}
    tensors: dict[str, LazyTensor] = {}
    for name, t in raw.items():
        if any(re.search(d, name) for d in DROP):
            skipped[name] = "Transformer Engine extra state (no weights)"
            continue
        tensors.update(_per_layer(name, t, args, notes))
    # A MoE layer's pre-MLP norm is read as pre_mlp_layernorm (the table's name for MoE layers) also when it
    # is stored under linear_fc1's name, as megatron-core 0.16.1's local spec stores it (its MoE layer keeps
    # the dense layer's key map: pre_mlp_layernorm -> mlp.linear_fc1.layer_norm_weight).
    L = args.get("num_layers")
    for i in range(L if isinstance(L, int) and L > 0 and args.get("num_experts") else 0):
        fused, sep = MCORE["mlp_norm"].format(i=i), MCORE["mlp_norm_sep"].format(i=i)
        if fused in tensors and sep not in tensors and MCORE["router"].format(i=i) in tensors:
            tensors[sep] = tensors.pop(fused)
            tensors[sep].name = sep
    V = args.get("vocab_size")
    for k in (MCORE["embed"], MCORE["head"]):
        t = tensors.get(k)
        if t is not None and isinstance(V, int) and 0 < V < t.shape[0]:
            tensors[k] = RowSlice(k, t, 0, V)
            notes.append(f"{k}: vocab padding rows {V}..{t.shape[0] - 1} stripped (args.vocab_size {V}, "
                         f"padded_vocab_size {args.get('padded_vocab_size')})")
    n_extra = sum(1 for v in skipped.values() if v.startswith("Transformer"))
    if n_extra:
        notes.append(f"{n_extra} _extra_state entries skipped: Transformer Engine metadata, no weights")
    return Checkpoint(str(it), "mcore", tensors, config=args,
                      meta={"files": sorted({str(c.file) for t in raw.values() for c in t.chunks}),
                            "skipped": skipped, "notes": notes, "iteration": state.get("iteration")})


# ------------------------------------------------------------------ config
def config_from_args(a: dict, tensors: dict, where="args") -> ModelConfig:
    try:
        D, L, H = a["hidden_size"], a["num_layers"], a["num_attention_heads"]
    except KeyError as e:
        raise InputError(where, f"Megatron-Core args lack {e.args[0]!r}") from None
    K = a.get("num_query_groups") if a.get("group_query_attention") else H
    K = K or H
    E = a.get("num_experts") or 0
    F = (a.get("moe_ffn_hidden_size") if E else None) or a.get("ffn_hidden_size") or 4 * D
    emb = tensors.get(MCORE["embed"])
    V = emb.shape[0] if emb is not None else a.get("vocab_size") or a.get("padded_vocab_size")
    sep = MCORE["attn_norm_sep"].format(i=0) in tensors
    msep = MCORE["mlp_norm_sep"].format(i=0) in tensors
    fam = families.for_block("mcore", mlp=Mlp.MOE if E else Mlp.GLU)
    return ModelConfig(rope_scaling=rope_scaling_of(a, where),
        family=fam.name, hidden=D, layers=L, heads=H, kv_heads=K,
        head_dim=a.get("kv_channels") or D // H, ffn=F, vocab=V, norm_eps=float(a.get("norm_epsilon") or 1e-5),
        rope_theta=float(a.get("rotary_base") or 10000.0),
        tied=not a.get("untie_embeddings_and_output_weights", False), max_pos=a.get("max_position_embeddings") or 2048,
        experts=E, experts_per_tok=a.get("moe_router_topk") or (2 if E else 0),
        hf_model_type=fam.hf_model_types[0],
        rotary_rows="interleaved" if a.get("rotary_interleaved") else "rotate_half",
        separate_attn_norm=sep, separate_mlp_norm=msep, **_window(a, L, where)).check(where)


def _window(a: dict, layers: int, where) -> dict:
    """``window_size`` (left, right) of Megatron-Core attention: a query attends to the ``left`` keys before
    it and itself, which is a sliding window of left + 1 keys (right must be 0 in a causal decoder);
    ``window_attn_skip_freq`` N makes every N-th layer (1-based) full attention, a list gives one flag per
    layer (megatron/core/transformer/utils.py ``is_layer_window_attention``)."""
    w = a.get("window_size")
    if w is None:
        return {}
    if not isinstance(w, (list, tuple)) or len(w) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                  for x in w):
        raise InputError(where, f"args key 'window_size': {w!r} is not a pair of integers")
    left, right = w
    if left < 0:  # (-1, ...) means no limit
        return {}
    if right != 0:
        raise InputError(where, f"args key 'window_size': right window {right} in a causal decoder")
    skip = a.get("window_attn_skip_freq")
    layers_with = None
    if isinstance(skip, list):  # one flag per layer, 1 = sliding window
        if len(skip) != layers or not all(x in (0, 1) and not isinstance(x, float) for x in skip):
            raise InputError(where, f"args key 'window_attn_skip_freq': expected {layers} flags 0/1")
        layers_with = tuple(i for i, x in enumerate(skip) if x)
    elif skip is not None:
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 1:
            raise InputError(where, f"args key 'window_attn_skip_freq': {skip!r} is not a positive integer")
        layers_with = tuple(i for i in range(layers) if (i + 1) % skip)
    return {"sliding_window": left + 1, "sliding_layers": layers_with}


def rope_scaling_of(a: dict, where="args") -> dict | None:
    """Rope scaling of Megatron-Core args as HF spells it, type-checked: ``rotary_seq_len_interpolation_factor``
    is linear scaling (RotaryEmbedding divides the positions by it); ``use_rope_scaling`` is Llama-3.1's
    scaling with ``rope_scaling_factor`` (``rotary_scaling_factor`` in newer releases, default 8)."""
    from ckdiff.models.config import Fields
    f = Fields(a, where, "args key")
    scaling = None
    linear = f.num("rotary_seq_len_interpolation_factor")
    if linear is not None and not 0 < linear < 1e6:
        f.fail("rotary_seq_len_interpolation_factor", "a positive number", linear)
    if linear and linear != 1.0:
        scaling = {"rope_type": "linear", "factor": linear}
    if f.flag("use_rope_scaling"):
        factor = f.num("rope_scaling_factor") or f.num("rotary_scaling_factor") or 8.0
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
    return scaling


def canonical(a: dict, tensors: dict) -> dict:
    from ckdiff.models.config import _rope_scaling
    c = config_from_args(a, tensors)
    out = dict(family=c.family, hidden=c.hidden, layers=c.layers, heads=c.heads, kv_heads=c.kv_heads,
               head_dim=c.head_dim, ffn=c.ffn, vocab=c.vocab, norm_eps=c.norm_eps, rope_theta=c.rope_theta,
               rope_scaling=_rope_scaling(c.rope_scaling), sliding_window=c.sliding_window,
               tied=c.tied, activation="silu" if a.get("swiglu") else "gelu", max_pos=c.max_pos)
    if c.experts:
        out.update(experts=c.experts, experts_per_tok=c.experts_per_tok)
    return out


# ------------------------------------------------------------------ layout table (HF -> mcore)
def hf_to_mcore(cfg: ModelConfig) -> list:
    from ckdiff.formats.layouts import HF, MOE_HF, family_for
    fam = family_for(cfg, "mcore")
    H, K, d, F = cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.ffn
    if cfg.rotary_rows == "interleaved":
        rope = Each((PermuteRope(H, d), PermuteRope(K, d), Identity()))
        qkv = Chain((rope, FuseQKV(H, K, d)))
    else:
        qkv = FuseQKV(H, K, d)
    moe = fam.block.mlp is Mlp.MOE
    an = MCORE["attn_norm_sep" if cfg.separate_attn_norm else "attn_norm"]
    mn = MCORE["mlp_norm_sep" if moe or cfg.separate_mlp_norm else "mlp_norm"]
    rules = [R(HF["embed"], MCORE["embed"]),
             R(HF["attn_norm"], an),
             R([HF["q"], HF["k"], HF["v"]], MCORE["qkv"], qkv),
             R(HF["o"], MCORE["o"]),
             R(HF["mlp_norm"], mn)]
    if moe:
        rules.append(R(MOE_HF["router"], MCORE["router"]))
        for e in range(cfg.experts):
            w = lambda n: MOE_HF["w"].format(e=e, n=n)  # noqa: E731  (w1 gate, w2 down, w3 up)
            x = lambda n: MCORE["expert"].replace("{e}", str(e)).replace("{n}", n)  # noqa: E731
            rules += [R([w(1), w(3)], x("fc1"), Concat((F, F), 0)), R(w(2), x("fc2"))]
    else:
        rules += [R([HF["gate"], HF["up"]], MCORE["fc1"], Concat((F, F), 0)),  # mcore GLU is [gate; up]
                  R(HF["down"], MCORE["fc2"])]
    rules.append(R(HF["norm"], MCORE["norm"]))
    if not cfg.tied:
        rules.append(R(HF["head"], MCORE["head"]))
    return rules


# ------------------------------------------------------------------ writer for fixtures and golden entries
def to_args(cfg: ModelConfig, padded_vocab: int) -> argparse.Namespace:
    """The Megatron-Core training args a checkpoint of ``cfg`` carries (names from arguments.py)."""
    return argparse.Namespace(
        num_layers=cfg.layers, hidden_size=cfg.hidden, ffn_hidden_size=cfg.ffn, num_attention_heads=cfg.heads,
        group_query_attention=cfg.kv_heads != cfg.heads, num_query_groups=cfg.kv_heads, kv_channels=cfg.head_dim,
        vocab_size=cfg.vocab, padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=128,
        untie_embeddings_and_output_weights=not cfg.tied, swiglu=True, normalization="RMSNorm",
        norm_epsilon=cfg.norm_eps, position_embedding_type="rope", rotary_base=int(cfg.rope_theta),
        rotary_interleaved=cfg.rotary_rows == "interleaved", max_position_embeddings=cfg.max_pos,
        num_experts=cfg.experts or None, moe_router_topk=cfg.experts_per_tok or 2,
        moe_ffn_hidden_size=cfg.ffn if cfg.experts else None, add_bias_linear=False,
        params_dtype=torch.float32, transformer_impl="transformer_engine", ckpt_format=BACKEND,
        **_rope_and_window_args(cfg))


def _rope_and_window_args(cfg: ModelConfig) -> dict:
    """The args that carry ``cfg``'s rope scaling and sliding window (the inverse of rope_scaling_of and
    _window); a kind Megatron-Core cannot say is refused in one line."""
    out: dict = {}
    if cfg.sliding_window:  # HF's window counts the query's own key; Megatron-Core's left size does not
        out["window_size"] = (cfg.sliding_window - 1, 0)
        if cfg.sliding_layers is not None:
            out["window_attn_skip_freq"] = [int(i in cfg.sliding_layers) for i in range(cfg.layers)]
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type") or sc.get("type")
    if kind in (None, "default"):
        return out
    if kind == "linear":
        out["rotary_seq_len_interpolation_factor"] = float(sc["factor"])
    elif kind == "llama3":
        out.update(use_rope_scaling=True, rope_scaling_factor=float(sc.get("factor", 8.0)))
    else:
        raise InputError("config", f"rope scaling {kind!r} has no Megatron-Core argument: refusing to drop it")
    return out


def mcore_state(hf: dict, cfg: ModelConfig, stacked: bool = True, pad_to: int = 128,
                faults=None) -> tuple[dict, int]:
    """HF tensors -> the DCP state dict of a Megatron-Core checkpoint (stacked or per-layer keys,
    experts on an expert axis, vocab padded, ``_extra_state`` byte items as TE writes them).
    ``faults`` (tests only, convert/faults.py) sees the table and the state dict."""
    from ckdiff.convert.faults import NONE, Step
    from ckdiff.tensor.lazy import EagerTensor
    from ckdiff.tensor.table import apply
    F = faults or NONE
    src = {k: EagerTensor(k, v, "<generated>") for k, v in hf.items()}
    per = {k: v.load() for k, v in apply(src, F.on_rules("mcore", cfg, hf_to_mcore(cfg)), cfg.layers).items()}
    Vp = -(-cfg.vocab // pad_to) * pad_to
    for k in (MCORE["embed"], MCORE["head"]):
        if k in per:
            per[k] = torch.cat([per[k], torch.zeros(Vp - cfg.vocab, per[k].shape[1], dtype=per[k].dtype)])
    out: dict = {}
    exp = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
    groups: dict = {}
    for k, v in per.items():
        m = exp.match(k)
        if m:
            groups.setdefault(m.group(3), {}).setdefault(int(m.group(1)), {})[int(m.group(2))] = v
            continue
        lm = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", k)
        if lm and stacked:
            groups.setdefault(lm.group(2), {})[int(lm.group(1))] = v
        else:
            out[k] = v
    for suffix, by_layer in groups.items():
        if suffix.startswith("linear_fc"):
            per_layer = {i: torch.stack([by_layer[i][e] for e in sorted(by_layer[i])]) for i in by_layer}
            if stacked:
                out[f"decoder.layers.mlp.experts.{suffix}"] = torch.stack([per_layer[i] for i in sorted(per_layer)])
            else:
                for i, v in per_layer.items():
                    out[f"decoder.layers.{i}.mlp.experts.{suffix}"] = v
        else:
            out[f"decoder.layers.{suffix}"] = torch.stack([by_layer[i] for i in sorted(by_layer)])
    te = "decoder.layers.self_attention.linear_qkv._extra_state" if stacked else \
        "decoder.layers.0.self_attention.linear_qkv._extra_state"
    out[te] = b"\x00fp8-meta"
    return F.on_output(out, Step("write_mcore", "mcore", cfg)), Vp


def write_mcore(out: Path, hf: dict, cfg: ModelConfig, stacked: bool = True, common: str = "dcp",
                iteration: int = 10, faults=None) -> Path:
    """A Megatron-Core ``torch_dist`` checkpoint root written with torch.distributed.checkpoint.save in one
    process, in megatron-core's key layout (megatron-core itself does not run on CPU here)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    state, Vp = mcore_state(hf, cfg, stacked, faults=faults)
    it = Path(out) / f"iter_{iteration:07d}"
    it.mkdir(parents=True, exist_ok=True)
    if common == "dcp":  # DCP's default planner stores a non-tensor value as torch.save(value)
        state[COMMON_KEY] = [{"args": to_args(cfg, Vp), "checkpoint_version": 3.0, "iteration": iteration}]
    else:
        torch.save({"args": to_args(cfg, Vp), "checkpoint_version": 3.0, "iteration": iteration}, it / "common.pt")
    from torch.distributed.checkpoint import DefaultSavePlanner
    with warnings.catch_warnings():  # one process on purpose: DCP says it assumes so
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save(state, checkpoint_id=str(it), no_dist=True, planner=DefaultSavePlanner(flatten_state_dict=False))
    (it / "metadata.json").write_text(json.dumps({"sharded_backend": BACKEND, "sharded_backend_version": 1}))
    (Path(out) / TRACKER).write_text(str(iteration))
    return Path(out)


# ------------------------------------------------------------------ declaration (formats/registry.py)
def _declare() -> None:
    from ckdiff.formats.layouts import DROP, register_table
    from ckdiff.formats.registry import Format, Runtime, register
    register_table("mcore", lambda cfg: hf_to_mcore(cfg))  # looked up per call: tests patch the table
    register(Format("mcore", "Megatron-Core torch_dist iteration directory (or its save root): metadata.json naming "
                             "torch_dist, .metadata + *.distcp, args from common.pt or the common state inside DCP",
                    is_mcore_dir, read_mcore, priority=10, layout="mcore", config_file=".", config=config_from_args,
                    canonical=canonical, drop=tuple(DROP["mcore"]), runtime=Runtime.VIA_HF,
                    layer=r"(?:^|\.)layers\.(\d+)\."))


_declare()
