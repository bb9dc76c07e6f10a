"""The scaling law: total cluster memory M -> model architecture (pure, no Ray, no torch).

The seed states ``width ~ M^0.6`` and ``depth ~ M^0.4``; taken literally that makes the parameter
count grow as ``depth * width^2 ~ M^1.6``, which cannot fit in memory M. The consistent reading
(DESIGN.md section 4): the parameter budget grows linearly with memory, and width and depth share
that growth with exponents in the seed's ratio 0.6 : 0.4::

    width ~ M^a, depth ~ M^b,  a : b = 0.6 : 0.4,  params ~ depth * width^2 ~ M^(2a + b) = M^1
    =>  a = 0.6 / 1.6 = 0.375,  b = 0.4 / 1.6 = 0.25
    width = W0 * (M / M0) ** 0.375
    depth = L0 * (M / M0) ** 0.25

so ``depth * width^2 ~ M^(0.25 + 2 * 0.375) = M^1``. Anchored at the seed's row M0 = 40 GB ->
L0 = 16 layers x W0 = 1024, then rounded to hardware-friendly sizes:

* depth to the nearest multiple of 8 (at least 8);
* width to the nearest multiple of 512; below 512 to the nearest multiple of 256 (at least 256).

Head structure is fixed across the whole law so that every upgrade can be function-preserving
(neuroray/model/growth.py): the head size stays HEAD_DIM = 64 (RoPE frequencies depend on the head
size, so changing it would change every attention score) and every ``KV_GROUP = 4`` query heads share
one key/value head (grouped-query attention with a constant group, so new query heads map onto new
KV heads). Widths are multiples of 256 = HEAD_DIM * KV_GROUP, so heads and KV heads are always whole.
The SwiGLU hidden size is ``8/3 * width`` rounded up to a multiple of 64 (as neuroray.model.layers).

Parameter count (untied embedding and head, no biases), with ``d`` = width, ``d_kv`` = n_kv_heads *
HEAD_DIM, ``f`` = SwiGLU hidden size, ``V`` = vocabulary, ``L`` = depth::

    per layer  = 2 d^2 (wq, wo) + 2 d d_kv (wk, wv) + 3 d f (w1, w2, w3) + 2 d (two RMSNorm gains)
    total      = L * per_layer + V d (embedding) + V d + d (LM head, final norm)

With d_kv = d/4 and f ~ 8d/3 a layer is ~10.5 d^2, so the non-embedding count is ~10.5 L d^2
(the textbook 12 L d^2 assumes full multi-head attention and a 4x two-matrix MLP).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from neuroray.config import ModelConfig

ANCHOR_MEMORY_BYTES = 40e9  # the seed's "10 nodes (40GB)" row ...
ANCHOR_DEPTH = 16  # ... is "16 layers x 1024 dim"
ANCHOR_WIDTH = 1024
WIDTH_EXPONENT = 0.6 / 1.6  # = 0.375
DEPTH_EXPONENT = 0.4 / 1.6  # = 0.25
DEPTH_MULTIPLE = 8
WIDTH_MULTIPLE = 512
SMALL_WIDTH_MULTIPLE = 256  # below 512: HEAD_DIM * KV_GROUP, the smallest width with whole KV heads
HEAD_DIM = 64
KV_GROUP = 4

PARAM_FORMULA = "P = L*(2d^2 + 2*d*d_kv + 3*d*f + 2d) + 2*V*d + d"


def raw_width(memory_bytes: float) -> float:
    """Unrounded width ``W0 * (M / M0) ** 0.375``."""
    return ANCHOR_WIDTH * (memory_bytes / ANCHOR_MEMORY_BYTES) ** WIDTH_EXPONENT


def raw_depth(memory_bytes: float) -> float:
    """Unrounded depth ``L0 * (M / M0) ** 0.25``."""
    return ANCHOR_DEPTH * (memory_bytes / ANCHOR_MEMORY_BYTES) ** DEPTH_EXPONENT


def round_depth(depth: float) -> int:
    """Nearest multiple of 8, at least 8."""
    return max(DEPTH_MULTIPLE, DEPTH_MULTIPLE * round(depth / DEPTH_MULTIPLE))


def round_width(width: float) -> int:
    """Nearest multiple of 512 (of 256 below 512), at least 256."""
    if width < WIDTH_MULTIPLE:
        return max(SMALL_WIDTH_MULTIPLE, SMALL_WIDTH_MULTIPLE * round(width / SMALL_WIDTH_MULTIPLE))
    return WIDTH_MULTIPLE * round(width / WIDTH_MULTIPLE)


def ffn_hidden_for(width: int) -> int:
    """SwiGLU hidden size: 8/3 * width rounded up to a multiple of 64 (same rule as neuroray.model.layers)."""
    return 64 * -(-8 * width // (3 * 64))


def shape(n_layers: int, width: int, base: ModelConfig | None = None) -> ModelConfig:
    """A ModelConfig of the law's family: fixed head size 64, KV group 4, SwiGLU 8/3.

    Sequence length, RoPE base, norm epsilon and init scale come from ``base``.
    """
    if width % (HEAD_DIM * KV_GROUP):
        raise ValueError(f"width {width} is not a multiple of {HEAD_DIM * KV_GROUP} (head size x KV group)")
    n_heads = width // HEAD_DIM
    base = base if base is not None else ModelConfig()
    return dataclasses.replace(
        base, name="auto", d_model=width, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_heads // KV_GROUP, ffn_hidden=ffn_hidden_for(width),
    )


def architecture_for_memory(memory_bytes: float, base: ModelConfig | None = None) -> ModelConfig:
    """The law's architecture for total cluster memory ``memory_bytes`` (see the module docstring)."""
    if not memory_bytes > 0:
        raise ValueError(f"total memory must be positive, got {memory_bytes}")
    return shape(round_depth(raw_depth(memory_bytes)), round_width(raw_width(memory_bytes)), base)


@dataclass(frozen=True)
class ParamCount:
    """Exact parameter count of a model of neuroray.model (see PARAM_FORMULA)."""

    per_layer: int
    layers: int  # n_layers * per_layer (the non-embedding count)
    embedding: int  # V * d
    head: int  # V * d + d (LM head + final norm)

    @property
    def total(self) -> int:
        return self.layers + self.embedding + self.head


def kv_width(cfg: ModelConfig) -> int:
    return cfg.n_kv_heads * (cfg.d_model // cfg.n_heads)


def ffn_width(cfg: ModelConfig) -> int:
    return cfg.ffn_hidden if cfg.ffn_hidden > 0 else ffn_hidden_for(cfg.d_model)


def param_count(cfg: ModelConfig, vocab_size: int) -> ParamCount:
    """``P = L*(2d^2 + 2*d*d_kv + 3*d*f + 2d) + 2*V*d + d`` split into its parts."""
    d, dkv, f = cfg.d_model, kv_width(cfg), ffn_width(cfg)
    per_layer = 2 * d * d + 2 * d * dkv + 3 * d * f + 2 * d
    return ParamCount(per_layer, cfg.n_layers * per_layer, vocab_size * d, vocab_size * d + d)


def layer_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of one layer per token: ``2 * (matmul params) + 2 * seq_len * d`` (causal attention).

    The matmul parameters are every weight but the norm gains; QK^T and AV cost ``2 * T * d`` each
    for full attention and half that with the causal mask.
    """
    d = cfg.d_model
    matmul = 2 * d * d + 2 * d * kv_width(cfg) + 3 * d * ffn_width(cfg)
    return 2.0 * matmul + 2.0 * seq_len * d


def head_flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """Forward FLOPs of the LM head per token (``2 V d``) plus the softmax/loss (~``5 V``)."""
    return 2.0 * vocab_size * cfg.d_model + 5.0 * vocab_size


def describe(cfg: ModelConfig) -> str:
    """``16 x 1024 (16 heads of 64, 4 KV heads, ffn 2752)``."""
    return (f"{cfg.n_layers} x {cfg.d_model} ({cfg.n_heads} heads of {cfg.d_model // cfg.n_heads}, "
            f"{cfg.n_kv_heads} KV heads, ffn {ffn_width(cfg)})")


def growth_ratio(old: ModelConfig, new: ModelConfig, vocab_size: int) -> float:
    """``P(new) / P(old)``: the quantity the upgrade rule compares with ``planner.min_growth``."""
    return param_count(new, vocab_size).total / param_count(old, vocab_size).total


def growth_blockers(old: ModelConfig, new: ModelConfig) -> list[str]:
    """Why ``old`` cannot grow into ``new`` function-preservingly; empty when it can.

    Growth may add layers, width, heads and SwiGLU units; it keeps the head size (RoPE), the
    query-heads-per-KV-head group (GQA), and sequence length, RoPE base and norm epsilon.
    """
    why = []
    for name in ("n_layers", "d_model", "n_heads", "n_kv_heads"):
        if getattr(new, name) < getattr(old, name):
            why.append(f"{name} shrinks {getattr(old, name)} -> {getattr(new, name)}")
    if ffn_width(new) < ffn_width(old):
        why.append(f"ffn shrinks {ffn_width(old)} -> {ffn_width(new)}")
    if old.d_model // old.n_heads != new.d_model // new.n_heads:
        why.append(f"head size changes {old.d_model // old.n_heads} -> {new.d_model // new.n_heads}")
    if old.n_heads // old.n_kv_heads != new.n_heads // new.n_kv_heads:
        why.append(f"query heads per KV head change {old.n_heads // old.n_kv_heads} -> {new.n_heads // new.n_kv_heads}")
    for name in ("max_seq_len", "rope_theta", "norm_eps"):
        if getattr(new, name) != getattr(old, name):
            why.append(f"{name} changes {getattr(old, name)} -> {getattr(new, name)}")
    return why


assert math.isclose(2 * WIDTH_EXPONENT + DEPTH_EXPONENT, 1.0)  # params ~ depth * width^2 ~ M^1
